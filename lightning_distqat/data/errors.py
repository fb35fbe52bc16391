"""Errors of the data server and its clients."""

from __future__ import annotations

__all__ = ["DataSourceError", "DataServerError"]


class DataSourceError(ValueError):
    """The dataset could not be loaded or does not fit the task: a missing path, an unknown dataset, a missing column,
    a batch larger than the dataset. The message names the thing and what was expected."""


class DataServerError(RuntimeError):
    """A trainer could not get its batches from the data server: it is not running, it stopped, it failed to prepare a
    batch, or it did not answer within ``request_timeout``."""
