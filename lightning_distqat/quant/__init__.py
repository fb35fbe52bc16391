"""Quantization: wire codecs for stage calls and pseudo-gradients (QAT comes with torchao)."""

from lightning_distqat.quant.codecs import CODECS, QuantizationError, decode, encode

__all__ = ["CODECS", "QuantizationError", "encode", "decode"]
