"""Lightning callbacks for swarm training."""

from __future__ import annotations

import time
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

__all__ = ["TrainingSummary"]


class TrainingSummary(Callback):
    """Prints a closing summary of a fit: steps, samples, samples/s, first and final training loss, where logs went.

    The numbers are kept in :attr:`summary` for scripts and tests.
    """

    def __init__(self, loss_key: str = "train_loss") -> None:
        self.loss_key = loss_key
        self.summary: dict[str, Any] = {}
        self._start: Optional[float] = None
        self._samples = 0
        self._first_loss: Optional[float] = None

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._start, self._samples, self._first_loss = time.perf_counter(), 0, None

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._samples += _batch_size(batch)
        if self._first_loss is None and self.loss_key in trainer.callback_metrics:
            self._first_loss = float(trainer.callback_metrics[self.loss_key])

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        seconds = time.perf_counter() - (self._start or time.perf_counter())
        final = trainer.callback_metrics.get(self.loss_key)
        self.summary = {
            "steps": trainer.global_step,
            "samples": self._samples,
            "seconds": seconds,
            "samples_per_second": self._samples / seconds if seconds > 0 else 0.0,
            "first_loss": self._first_loss,
            "final_loss": float(final) if final is not None else None,
            "log_dir": trainer.log_dir,
        }
        s = self.summary
        loss = f"{s['first_loss']:.4f} -> {s['final_loss']:.4f}" if s["final_loss"] is not None and s["first_loss"] \
            is not None else "n/a"
        rank_zero_info(
            f"\nSummary: {s['steps']} steps, {s['samples']} samples in {seconds:.1f}s "
            f"({s['samples_per_second']:.1f} samples/s); {self.loss_key} {loss}; logs in {s['log_dir']}"
        )


def _batch_size(batch: Any) -> int:
    """Rows in a batch: the length of its first tensor (tuples, lists and dicts of tensors alike)."""
    while isinstance(batch, (list, tuple, dict)) and len(batch):
        batch = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return len(batch) if hasattr(batch, "__len__") else 1
