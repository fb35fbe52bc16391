"""Offline datasets: real data that ships inside installed packages, so examples and tests need no download."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

__all__ = ["digits_images"]


def digits_images(*, image_size: int = 32, val_fraction: float = 0.15, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's handwritten digits (1797 real 8x8 scans, 10 classes), as 3-channel ``image_size`` images.

    The data ships inside scikit-learn, so this works offline. Returns ``(train, val)`` TensorDatasets of
    ``(image [3, H, W] float32 normalised, label int64)``, split with a fixed seed.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"digits_images: val_fraction must be in (0, 1), got {val_fraction}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(labels) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val])
