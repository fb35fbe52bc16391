"""Hydra configs shipped with the package (also visible as conf/ at the repository root)."""
