"""Data for trainers: the shared-memory data server (``distqat-data``), its datamodule, and dataset loading."""

from lightning_distqat.data.datamodule import SharedMemoryDataModule
from lightning_distqat.data.errors import DataServerError, DataSourceError
from lightning_distqat.data.server import DataServer

__all__ = ["SharedMemoryDataModule", "DataServer", "DataServerError", "DataSourceError"]
