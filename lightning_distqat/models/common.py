"""What the example classifiers share: one step that reads ``(x, y)`` or the data server's batches."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

__all__ = ["Classifier"]


class Classifier(pl.LightningModule):
    """Cross-entropy training and validation steps with loss and accuracy logged; subclasses give ``forward`` and
    ``configure_optimizers``. Batches are ``(x, y)`` or ``{"pixel_values", "labels"}``."""

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = (batch["pixel_values"], batch["labels"]) if isinstance(batch, dict) else batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}_loss", loss, prog_bar=True)
        self.log(f"{stage}_acc", (logits.argmax(-1) == y).float().mean(), prog_bar=stage == "val")
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")
