"""Export a model trained in the swarm (its stages came home at the end of ``fit``) as a torchao-quantized checkpoint
of the whole model: every stage with a QAT scheme is converted, everything else stays as it is."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any, Optional, Sequence

import torch
from torch import nn

from lightning_distqat.config import QuantConfig
from lightning_distqat.quant.qat import convert

__all__ = ["export_quantized", "load_quantized"]


def _stage(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise ValueError(f"export: stage '{path}' is not a submodule of {type(model).__name__}; available: "
                         f"{', '.join(names[:40])}") from None


def export_quantized(model: nn.Module, stages: Sequence[str], quant: QuantConfig,
                     path: Optional[str] = None) -> nn.Module:
    """Convert (in place) each of ``stages`` whose resolved ``quant.qat`` is set to torchao-quantized weights; save the
    whole model's state dict with the settings to ``path`` when given. Returns ``model``."""
    converted = []
    for name in stages:
        q = quant.for_stage(name)
        if q.qat:
            convert(_stage(model, name), q.qat, q.qat_group_size, where=f"stage '{name}'")
            converted.append(name)
    if not converted:
        raise ValueError("export: no stage has a QAT scheme (QuantConfig.qat, enabled=True); nothing to quantize")
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save({"state_dict": model.state_dict(), "stages": list(stages), "quant": asdict(quant),
                    "converted": converted}, path)
    return model


def load_quantized(model: nn.Module, path: str) -> nn.Module:
    """Load an :func:`export_quantized` checkpoint into a freshly built ``model`` of the same architecture."""
    checkpoint: dict[str, Any] = torch.load(path, weights_only=True, map_location="cpu")
    quant = QuantConfig(**checkpoint["quant"])
    for name in checkpoint["converted"]:
        q = quant.for_stage(name)
        convert(_stage(model, name), q.qat, q.qat_group_size, where=f"stage '{name}'")
    model.load_state_dict(checkpoint["state_dict"], assign=True)
    return model
