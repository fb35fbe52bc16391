"""Wire codecs: how a floating-point tensor is shrunk before it crosses the network, and restored after.

Each codec turns a tensor into a small header (plain values) and a list of tensors, and back. Pure functions of the
input, unit-tested without processes.

- ``none``: the tensor as it is (exact).
- ``fp16``: a cast after scaling by a per-tensor factor (the largest magnitude maps to 2^14), so neither tiny
  gradients underflow nor large values overflow; ``bf16``: a cast.
- ``int8``: per block of ``block_size`` values, one fp16 scale (absmax / 127) and int8 codes.
- ``int4``: per block of ``block_size`` values, one fp16 scale (absmax / 7) and 4-bit codes, two per byte.

Non-finite values (NaN, +-Inf) are never silently changed: ``none`` passes them through exactly; every lossy codec
raises :class:`QuantizationError` naming where they were, because one NaN would poison a whole block's scale.
Integer and boolean tensors always pass through unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_distqat.config import WIRE_CODECS as CODECS

__all__ = ["CODECS", "QuantizationError", "encode", "decode", "encode_all", "decode_all", "payload_bytes",
           "check_codec"]



class QuantizationError(ValueError):
    """A tensor cannot be encoded with the requested codec (non-finite values, or out of the codec's range)."""


def check_codec(name: str, what: str) -> str:
    if name not in CODECS:
        raise ValueError(f"{what}: unknown codec {name!r}; expected one of {', '.join(CODECS)}")
    return name


def _finite(tensor: torch.Tensor, codec: str, where: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise QuantizationError(f"{where}: {bad} non-finite value(s) (NaN/Inf) cannot be encoded with codec "
                                f"'{codec}'; fix the model's numerics (or send this tensor with codec 'none')")


def encode(tensor: torch.Tensor, codec: str, block_size: int = 64, where: str = "tensor"
           ) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """``(header, tensors)`` for ``tensor`` under ``codec``. ``where`` names the tensor in error messages."""
    if codec == "none" or not tensor.is_floating_point():
        return {"c": "none"}, [tensor]
    _finite(tensor, codec, where)
    header = {"c": codec, "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}
    flat = tensor.detach().reshape(-1).float()
    if codec == "fp16":
        # scaled so that the largest magnitude sits near 2^14: small tensors (gradients) keep fp16's full relative
        # precision instead of underflowing, and nothing overflows
        absmax = float(flat.abs().max()) if flat.numel() else 0.0
        header["scale"] = 2.0**14 / absmax if absmax > 0 else 1.0
        return header, [(flat * header["scale"]).half()]
    if codec == "bf16":
        return header, [flat.bfloat16()]
    if codec in ("int8", "int4"):
        if block_size < 2 or (codec == "int4" and block_size % 2):
            raise ValueError(f"codec {codec}: block_size must be >= 2 (and even for int4), got {block_size}")
        levels = 127 if codec == "int8" else 7
        n = flat.numel()
        padded = torch.nn.functional.pad(flat, (0, (-n) % block_size)).view(-1, block_size)
        absmax = padded.abs().amax(dim=1, keepdim=True)
        scale = (absmax / levels).half().float()  # the scale that travels (fp16), used on both sides
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.clamp(torch.round(padded / safe), -levels, levels).to(torch.int8)
        header["block"] = block_size
        codes = codes.view(-1)[:n]  # the last block's padding does not travel
        if codec == "int4":
            nibbles = (torch.nn.functional.pad(codes, (0, n % 2)) + 8).to(torch.uint8)  # 1..15 (pad: 8)
            codes = (nibbles[0::2] | (nibbles[1::2] << 4)).view(torch.int8)
        return header, [scale.half().view(-1), codes]
    raise ValueError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
MAX_BLOCK = 2**16
MAX_DIMS = 16


def _check(header: dict[str, Any], tensors: list[torch.Tensor]) -> tuple[str, int, tuple[int, ...], torch.dtype]:
    """Check a codec header against the tensors that came with it, before anything is allocated; ValueError names
    what does not fit."""
    codec = header.get("c")
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r} in a message; expected one of {', '.join(CODECS)}")
    if codec == "none":
        if len(tensors) != 1:
            raise ValueError(f"codec 'none' carries 1 tensor, got {len(tensors)}")
        return codec, 0, (), torch.float32
    dtype = _DTYPES.get(header.get("dtype"))
    shape = header.get("shape")
    if dtype is None or not isinstance(shape, list) or len(shape) > MAX_DIMS \
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**48 for d in shape):
        raise ValueError(f"codec {codec}: bad dtype or shape in {str(header)[:200]}")
    numel = math.prod(shape)
    if codec in ("fp16", "bf16"):
        wanted = torch.float16 if codec == "fp16" else torch.bfloat16
        if len(tensors) != 1 or tensors[0].dtype != wanted or tensors[0].numel() != numel:
            raise ValueError(f"codec {codec}: expected one {wanted} tensor of {numel} values")
        scale = header.get("scale", 1.0)
        if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"codec {codec}: bad scale {scale!r}")
        return codec, 0, tuple(shape), dtype
    block = header.get("block")
    if not isinstance(block, int) or not 2 <= block <= MAX_BLOCK or (codec == "int4" and block % 2):
        raise ValueError(f"codec {codec}: block size {block!r} is not in [2, {MAX_BLOCK}]")
    if len(tensors) != 2:
        raise ValueError(f"codec {codec} carries 2 tensors (scales, codes), got {len(tensors)}")
    scale, codes = tensors
    code_count = numel if codec == "int8" else -(-numel // 2)
    if scale.dtype != torch.float16 or scale.numel() != -(-numel // block) or codes.dtype != torch.int8 \
            or codes.numel() != code_count:
        raise ValueError(f"codec {codec}: {scale.numel()} scales and {codes.numel()} codes do not fit {numel} values "
                         f"in blocks of {block}")
    return codec, block, tuple(shape), dtype


def decode(header: dict[str, Any], tensors: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`encode`: the tensor in its original dtype and shape. The header is checked against the
    tensors first (a message cannot make this allocate more than its own size implies)."""
    codec, block, shape, dtype = _check(header, tensors)
    if codec == "none":
        return tensors[0]
    numel = math.prod(shape)
    if codec in ("fp16", "bf16"):
        return (tensors[0].float() / float(header.get("scale", 1.0))).view(shape).to(dtype)
    scale, codes = tensors
    if codec == "int4":
        packed = codes.view(torch.uint8)
        nibbles = torch.stack([packed & 0xF, packed >> 4], dim=1).view(-1)
        codes = nibbles.to(torch.int8) - 8
    codes = torch.nn.functional.pad(codes.float()[:numel], (0, scale.numel() * block - numel))
    values = codes.view(-1, block) * scale.float().view(-1, 1)
    return values.view(-1)[:numel].view(shape).to(dtype)


def payload_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of tensor data that a message carries."""
    return sum(t.numel() * t.element_size() for t in tensors)


def encode_all(tensors: list[torch.Tensor], codec: str, block_size: int, where: str
               ) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    """Encode several tensors: per-tensor headers and one flat list of tensors to send."""
    headers, flat = [], []
    for i, t in enumerate(tensors):
        header, parts = encode(t, codec, block_size, f"{where} #{i}")
        header["n"] = len(parts)
        headers.append(header)
        flat.extend(parts)
    return headers, flat


def decode_all(headers: Any, flat: list[torch.Tensor], max_bytes: int = 2**40) -> list[torch.Tensor]:
    """Inverse of :func:`encode_all`; ValueError for headers that do not describe ``flat``, or that decode to more
    than ``max_bytes`` (checked for all of them before anything is decoded: int4 codes in float64 would otherwise
    grow 16-fold)."""
    if not isinstance(headers, list) or not all(isinstance(h, dict) for h in headers):
        raise ValueError("codec headers must be a list of dicts")
    checked, i = [], 0
    for header in headers:
        n = header.get("n")
        if not isinstance(n, int) or not 1 <= n <= 2 or i + n > len(flat):
            raise ValueError(f"codec header names {n!r} tensors; the message has {len(flat) - i} left")
        codec, _, shape, dtype = _check(header, flat[i:i + n])
        size = flat[i].numel() * flat[i].element_size() if codec == "none" else math.prod(shape) * dtype.itemsize
        checked.append((header, flat[i:i + n], size))
        i += n
    if i != len(flat):
        raise ValueError(f"message carries {len(flat)} tensors but its codec headers describe {i}")
    decoded_bytes = sum(size for _, _, size in checked)
    if decoded_bytes > max_bytes:
        raise ValueError(f"the message decodes to {decoded_bytes} bytes; at most {max_bytes} are accepted")
    return [decode(header, tensors) for header, tensors, _ in checked]
