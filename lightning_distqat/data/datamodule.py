"""``SharedMemoryDataModule``: a LightningDataModule fed by the machine's shared-memory data server."""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import replace
from typing import Any, Iterator, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_distqat.config import DataConfig
from lightning_distqat.data.client import DataClient
from lightning_distqat.data.embedded import EmbeddedDataServer
from lightning_distqat.data.errors import DataServerError
from lightning_distqat.data.order import share_length
from lightning_distqat.data.server import compatibility_key, default_address

__all__ = ["SharedMemoryDataModule"]

log = logging.getLogger(__name__)


class SharedMemoryDataModule(pl.LightningDataModule):
    """Batches from the data server of this machine, for any Trainer (with or without DistqatStrategy).

    Args:
        config: what to serve (:class:`~lightning_distqat.config.DataConfig`); keyword arguments override its fields,
            so ``SharedMemoryDataModule(source="data/train.parquet", task="causal_lm", batch_size=8)`` works too.
        trainer_id: this trainer's share of each epoch (``0 .. num_trainers - 1``). Default: the Trainer's global rank.
        embedded: start a server in a child process when none answers at the config's address (default ``True``).
            With ``False`` a missing server is an error.

    Each batch is a dict of tensors (``pixel_values``/``labels``, ``input_ids``/``attention_mask``/``labels`` or
    ``input_values``/``attention_mask``/``labels``) plus ``sample_ids``, the rows' indices in the split. A batch counts
    as trained after ``on_train_batch_end``; a trainer restarted after a crash gets what it had not finished.
    """

    def __init__(self, config: Optional[DataConfig] = None, *, trainer_id: Optional[int] = None,
                 embedded: bool = True, **overrides: Any) -> None:
        super().__init__()
        config = config or DataConfig()
        try:
            self.config = replace(config, **overrides)
        except TypeError as e:
            raise TypeError(f"SharedMemoryDataModule: {e}; valid options are the fields of DataConfig") from None
        self.trainer_id = trainer_id
        self.embedded = embedded
        self.info: dict[str, Any] = {}
        self._server: Optional[EmbeddedDataServer] = None
        self._clients: dict[str, DataClient] = {}
        self._address: Optional[str] = None
        self._trained: deque[tuple[int, int]] = deque()
        self._callback = _AckTrainedBatches(self)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        trainer = self.trainer
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        tid = self.trainer_id if self.trainer_id is not None else rank
        cfg = self.config
        if cfg.num_trainers < world:
            cfg = self.config = replace(cfg, num_trainers=world)
        address, self.info = self._find_server(cfg, tid)
        if address is None:
            if not self.embedded:
                raise DataServerError(f"no data server answers at {default_address(cfg)}; start `distqat-data` with "
                                      f"this DataConfig or let SharedMemoryDataModule start one (embedded=True)")
            # one trainer: a private server; several ranks of one Trainer: rank 0's server at the shared address
            address = default_address(cfg, f"-{os.getpid()}" if world == 1 and cfg.address is None else "")
            if rank == 0:
                self._server = EmbeddedDataServer(replace(cfg, address=address))
                self._server.start()
            probe = DataClient(address, tid, request_timeout=cfg.request_timeout)
            try:
                self.info = probe.connect(timeout=cfg.startup_timeout).info()  # other ranks wait for rank 0's server
            finally:
                probe.close()
        self._address, self._tid = address, tid
        if trainer is not None and self._callback not in trainer.callbacks:
            trainer.callbacks.append(self._callback)

    def train_dataloader(self) -> "_ServerLoader":
        return _ServerLoader(self, "train")

    def val_dataloader(self) -> Any:
        return _ServerLoader(self, "validation") if "validation" in self.info.get("rows", {}) else []

    def teardown(self, stage: str) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self.trainer is not None and self._callback in self.trainer.callbacks:
            self.trainer.callbacks.remove(self._callback)

    # ------------------------------------------------------------------ internals
    def _find_server(self, cfg: DataConfig, tid: int) -> tuple[Optional[str], dict[str, Any]]:
        """The address and info of a running server for ``cfg`` at its shared address, if one answers there."""
        address = default_address(cfg)
        probe = DataClient(address, tid, request_timeout=cfg.request_timeout)
        try:
            info = probe.connect().info()
        except DataServerError:
            return None, {}
        finally:
            probe.close()
        if info["config"] == compatibility_key(cfg):
            return address, info
        if cfg.address is not None or not self.embedded:
            raise DataServerError(f"the data server at {address} serves {info['config']}, but this trainer asks for "
                                  f"{compatibility_key(cfg)}; use the server's DataConfig, or another name or address")
        log.info("The data server at %s serves another dataset; starting this trainer's own", address)
        return None, {}

    def _client(self, split: str) -> DataClient:
        if self._address is None:
            raise DataServerError("SharedMemoryDataModule: call setup() (the Trainer does) before asking for batches")
        if split not in self._clients:
            self._clients[split] = DataClient(self._address, self._tid,
                                              request_timeout=self.config.request_timeout).connect()
        return self._clients[split]

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _ack_trained(self) -> None:
        if self._trained:
            epoch, index = self._trained.popleft()
            self._client("train").ack(epoch, index)


class _ServerLoader:
    """What ``train_dataloader``/``val_dataloader`` return: an iterable over one epoch of this trainer's batches."""

    def __init__(self, dm: SharedMemoryDataModule, split: str) -> None:
        self.dm, self.split = dm, split
        batches = dm.info["batches"][split]
        self._len = share_length(batches, dm.info["num_trainers"], dm._tid) if split == "train" else batches

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[dict[str, Any]]:
        client = self.dm._client(self.split)
        epoch = self.dm._epoch()
        total, done = client.start(self.split, epoch)
        if done:
            log.info("Trainer %d resumes epoch %d at batch %d of %d (the data server kept its place)", self.dm._tid,
                     epoch, done, total)
        if self.split == "train":
            self.dm._trained.clear()  # prefetched but never trained: the server sends them again
        for index, batch in client.batches():
            if self.split == "train":
                self.dm._trained.append((epoch, index))
            yield batch


class _AckTrainedBatches(Callback):
    """Tells the data server which batch a training step finished (added by the datamodule to its Trainer)."""

    def __init__(self, dm: SharedMemoryDataModule) -> None:
        self.dm = dm

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.dm._ack_trained()
