"""Quantization: wire codecs for stage calls and pseudo-gradients (``codecs``, ``averaging``), torchao QAT of stages
(``qat``) and the export of trained models to torchao-quantized weights (``export``)."""

from lightning_distqat.quant.codecs import CODECS, QuantizationError, decode, encode

__all__ = ["CODECS", "QuantizationError", "encode", "decode"]
