"""Example model families, each a LightningModule with named stage paths."""

from lightning_distqat.models.mlp import MLPClassifier
from lightning_distqat.models.resnet import ResNetClassifier

__all__ = ["MLPClassifier", "ResNetClassifier"]
