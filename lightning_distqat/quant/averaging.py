"""Pseudo-gradient codecs for hivemind's all-reduce.

hivemind's averager serializes every part it sends with a ``CompressionBase`` and deserializes what it receives by the
compression type written in the message; the reducer accumulates the decoded parts in fp32 and sends the average back
with the same compression. hivemind's wire format has a fixed list of compression types, so distqat's block codecs
take two of its slots, in the processes that use them (trainers and experts of one experiment all do):
``QUANTILE_8BIT`` carries distqat's int8 (absmax per block) and ``BLOCKWISE_8BIT`` (bitsandbytes-based in hivemind,
unavailable without that package) carries distqat's 4-bit codec. ``fp16`` is hivemind's own FLOAT16.
"""

from __future__ import annotations

import math
import struct

import torch

from lightning_distqat import _hivemind  # noqa: F401  (imports hivemind quietly, before the lines below do)
from hivemind.compression import CompressionBase, CompressionInfo
from hivemind.compression import serialization as _serialization
from hivemind.proto import runtime_pb2

from lightning_distqat.quant.codecs import decode, encode

__all__ = ["block_codec_compression"]

_SLOTS = {"int8": runtime_pb2.CompressionType.QUANTILE_8BIT, "int4": runtime_pb2.CompressionType.BLOCKWISE_8BIT}


class _BlockCodec(CompressionBase):
    """distqat's int8/int4 block codec in hivemind's compression interface. The buffer is self-describing: block
    size, then the fp16 scales, then the codes."""

    def __init__(self, codec: str, block_size: int) -> None:
        self.codec, self.block_size = codec, block_size
        self.compression_type = _SLOTS[codec]

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        header, (scale, codes) = encode(tensor.detach().float(), self.codec, self.block_size, "pseudo-gradient")
        buffer = struct.pack("<I", self.block_size) + scale.numpy().tobytes() + codes.numpy().tobytes()
        return runtime_pb2.Tensor(compression=self.compression_type, buffer=buffer, size=tensor.shape,
                                  dtype="float32", requires_grad=False)

    def extract(self, serialized: runtime_pb2.Tensor) -> torch.Tensor:
        (block,) = struct.unpack_from("<I", serialized.buffer)
        shape = list(serialized.size)
        numel = math.prod(shape)
        blocks = -(-numel // block)  # codes follow the scales: numel bytes (int8) or ceil(numel / 2) (int4)
        scale = torch.frombuffer(bytearray(serialized.buffer[4:4 + 2 * blocks]), dtype=torch.float16)
        codes = torch.frombuffer(bytearray(serialized.buffer[4 + 2 * blocks:]), dtype=torch.int8)
        header = {"c": self.codec, "dtype": "float32", "shape": shape, "block": block}
        return decode(header, [scale, codes])  # fp32: the reducer accumulates in fp32

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        bits = 8 if self.codec == "int8" else 4
        return (bits / 8 + 2 / self.block_size) / 4


def block_codec_compression(codec: str, block_size: int) -> CompressionBase:
    """distqat's ``int8`` or ``int4`` block codec as a hivemind compression; registers it for decoding in this
    process (and the processes it forks later)."""
    if codec not in _SLOTS:
        raise ValueError(f"block codec {codec!r} is unknown; expected one of {', '.join(_SLOTS)}")
    compression = _BlockCodec(codec, block_size)
    _serialization._BASE_COMPRESSION_TYPES[runtime_pb2.CompressionType.Name(_SLOTS[codec])] = compression
    return compression
