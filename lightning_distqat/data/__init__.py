"""Datasets for the examples and tests (the shared-memory data server comes with the [data] issue)."""
