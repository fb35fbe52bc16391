"""What the example classifiers share: one step that reads ``(x, y)`` or the data server's batches."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Classifier", "SequenceModel", "stage_groups"]


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


def stage_groups(layers: Sequence[nn.Module], stage_layers: Sequence[int], make: Callable[[list], nn.Module],
                 owner: str) -> nn.ModuleList:
    """``layers`` cut into consecutive groups of ``stage_layers`` counts, each wrapped by ``make``: one stage each."""
    if not stage_layers or any(int(n) < 1 for n in stage_layers) or sum(int(n) for n in stage_layers) != len(layers):
        raise ValueError(f"{owner}: stage_layers must be positive counts that add up to the {len(layers)} layers, got "
                         f"{list(stage_layers)}")
    groups, start = [], 0
    for n in stage_layers:
        groups.append(make(list(layers[start:start + int(n)])))
        start += int(n)
    return nn.ModuleList(groups)


class SequenceModel(pl.LightningModule):
    """Training and validation steps over the data server's dict batches with the loss of ``loss(batch)`` logged,
    and AdamW with the ``lr`` and ``weight_decay`` hyperparameters."""

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        loss = self.loss(batch)
        self.log(f"{stage}_loss", loss, prog_bar=True)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
