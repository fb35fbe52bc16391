"""Which hivemind compression carries a replica's pseudo-gradients through the all-reduce, and what it saves."""

from __future__ import annotations

import torch

from lightning_distqat import _hivemind  # noqa: F401  (imports hivemind quietly, before the lines below do)
from hivemind.compression import CompressionBase, CompressionInfo, Float16Compression, NoCompression

from lightning_distqat.config import PSEUDO_GRADIENT_CODECS

__all__ = ["pseudo_gradient_compression", "compressed_bytes"]


def pseudo_gradient_compression(codec: str, block_size: int) -> CompressionBase:
    """The compression to give hivemind's averager for ``codec`` (``none``, ``fp16``, ``int8``, ``int4``)."""
    if codec == "none":
        return NoCompression()
    if codec == "fp16":
        return Float16Compression()
    if codec not in PSEUDO_GRADIENT_CODECS:
        raise ValueError(f"pseudo-gradient codec {codec!r} is unknown; expected one of "
                         f"{', '.join(PSEUDO_GRADIENT_CODECS)}")
    from lightning_distqat.quant.averaging import block_codec_compression

    return block_codec_compression(codec, block_size)


def compressed_bytes(tensors: list[torch.Tensor], compression: CompressionBase) -> int:
    """Bytes that ``tensors`` take on the wire under ``compression`` (hivemind's own estimate per tensor)."""
    return sum(int(t.numel() * t.element_size() * compression.estimate_compression_ratio(CompressionInfo.from_tensor(t)))
               for t in tensors)
