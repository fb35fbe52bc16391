"""torchao quantization-aware training of stages, and the export of a trained model to torchao-quantized weights.

Schemes (``QuantConfig.qat``):

- ``int8-int4``: int8 per-token dynamic (asymmetric) activations, int4 symmetric weights per group of
  ``qat_group_size`` (torchao's ``Int8DynamicActivationIntxWeightConfig``);
- ``int4-weight``: int4 weights per group only (``IntxWeightOnlyConfig``).

``prepare`` swaps every ``nn.Linear`` of a stage for torchao's ``FakeQuantizedLinear`` (same parameter names, so state
dicts move between prepared and plain modules unchanged). ``convert`` turns plain linears holding QAT-trained weights
into torchao-quantized ones; the fake quantizers compute exactly what the quantized model computes.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from lightning_distqat.config import QAT_SCHEMES as SCHEMES

__all__ = ["SCHEMES", "base_config", "prepare", "convert", "fake_quantized_linears"]



def base_config(scheme: str, group_size: int = 32) -> Any:
    """The torchao post-training config that ``scheme`` trains for."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    if scheme == "int8-int4":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))
    if scheme == "int4-weight":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    raise ValueError(f"QAT scheme {scheme!r} is unknown; expected one of {', '.join(SCHEMES)} (or None)")


def _check_linears(module: nn.Module, group_size: int, where: str) -> None:
    linears = [(n, m) for n, m in module.named_modules() if type(m) is nn.Linear]
    if not linears:
        raise ValueError(f"{where}: QAT quantizes nn.Linear layers and this stage has none; set its qat to None")
    bad = [f"{n or '<stage>'} (in_features={m.in_features})" for n, m in linears if m.in_features % group_size]
    if bad:
        raise ValueError(f"{where}: qat_group_size={group_size} must divide the in_features of every linear layer; "
                         f"it does not for {', '.join(bad)}")


def prepare(module: nn.Module, scheme: str, group_size: int = 32, where: str = "stage") -> nn.Module:
    """Insert torchao fake quantizers into ``module`` (in place) for ``scheme``."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    _check_linears(module, group_size, where)
    quantize_(module, QATConfig(base_config(scheme, group_size), step="prepare"))
    return module


def fake_quantized_linears(module: nn.Module) -> int:
    """How many torchao fake-quantized linear layers ``module`` holds."""
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    return sum(isinstance(m, FakeQuantizedLinear) for m in module.modules())


def convert(module: nn.Module, scheme: str, group_size: int = 32, where: Optional[str] = None) -> nn.Module:
    """Quantize the plain linears of ``module`` (QAT-trained weights) with torchao, in place."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    if fake_quantized_linears(module):
        quantize_(module, QATConfig(base_config(scheme, group_size), step="convert"))
    else:
        _check_linears(module, group_size, where or "stage")
        quantize_(module, base_config(scheme, group_size))
    return module
