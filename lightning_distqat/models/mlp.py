"""A small MLP classifier: the lightest model whose blocks are stages (tests, the failover drill, quick swarms)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_distqat.models.common import Classifier

__all__ = ["MLPClassifier"]


class MLPClassifier(Classifier):
    """Inputs flattened, ``depth`` blocks of Linear + Tanh (``blocks.0`` .. ``blocks.{depth-1}``, the stages), a
    linear head kept on the trainer; cross-entropy, SGD with momentum. Batches are ``(x, y)`` or the data server's
    ``{"pixel_values", "labels"}``."""

    def __init__(self, in_features: int = 192, width: int = 64, depth: int = 3, num_classes: int = 10,
                 lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(in_features if i == 0 else width, width), nn.Tanh())
                                      for i in range(depth)])
        self.head = nn.Linear(width, num_classes)

    @property
    def STAGES(self) -> list[str]:  # noqa: N802 - the models' common attribute name
        """Stage paths for DistqatStrategy: every block."""
        return [f"blocks.{i}" for i in range(len(self.blocks))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x.flatten(1)))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
