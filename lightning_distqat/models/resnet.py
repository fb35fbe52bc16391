"""ResNet (CV) from torchvision with random init. Its residual layers are the stages; torchvision's own forward is
left untouched, so the stages are replaced by remote proxies exactly as in any user's model."""

from __future__ import annotations

from typing import Any

import torch
import torchvision

from lightning_distqat.models.common import Classifier

__all__ = ["ResNetClassifier"]


class ResNetClassifier(Classifier):
    """``torchvision.models.<arch>(weights=None)`` trained with SGD (momentum, cosine LR)."""

    STAGES = ["net.layer1", "net.layer2", "net.layer3", "net.layer4"]
    """Stage paths for DistqatStrategy: the four residual layers. Stem and classifier head stay on the trainer."""

    def __init__(self, arch: str = "resnet18", num_classes: int = 10, lr: float = 0.05, max_steps: int = 1000) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.hparams.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
