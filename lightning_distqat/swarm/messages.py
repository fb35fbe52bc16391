"""How a call crosses the wire: a small msgpack header plus a list of tensors, split into a stream of hivemind
``ExpertRequest``/``ExpertResponse`` messages so that no single message exceeds the P2P size limit."""

from __future__ import annotations

import io
from typing import Any, AsyncIterator, Iterable, Iterator, Optional, Sequence, Type, TypeVar, Union

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

__all__ = ["CHUNK_BYTES", "pack", "unpack", "unpack_stream", "state_to_tensor", "tensor_to_state"]

CHUNK_BYTES = 2**20
"""Bytes of tensor data per streamed message (well under hivemind's 4 MiB per-message limit)."""

Message = Union[runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse]
M = TypeVar("M", runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse)


def pack(kind: Type[M], header: dict[str, Any], tensors: Sequence[torch.Tensor] = ()) -> Iterator[M]:
    """Yield messages of type ``kind``: the first carries the header, the tensors follow in chunks."""
    parts: list[runtime_pb2.Tensor] = []
    for tensor in tensors:
        serialized = serialize_torch_tensor(tensor.detach().cpu().contiguous())
        parts.extend(split_for_streaming(serialized, CHUNK_BYTES))
    header_bytes = MSGPackSerializer.dumps(header)
    if not parts:
        yield kind(metadata=header_bytes)
        return
    budget, batch, first = 0, [], True
    for part in parts:
        if batch and budget + len(part.buffer) > CHUNK_BYTES:
            yield kind(metadata=header_bytes if first else b"", tensors=batch)
            budget, batch, first = 0, [], False
        batch.append(part)
        budget += len(part.buffer)
    yield kind(metadata=header_bytes if first else b"", tensors=batch)


def unpack(messages: Iterable[Message]) -> tuple[Optional[dict[str, Any]], list[torch.Tensor]]:
    """Inverse of :func:`pack`: the header and the tensors, in order. The header is None if no message came (a
    stream that the other side closed without answering)."""
    header: Optional[dict[str, Any]] = None
    tensors: list[torch.Tensor] = []
    pending: list[runtime_pb2.Tensor] = []
    for i, message in enumerate(messages):
        if i == 0:
            header = MSGPackSerializer.loads(message.metadata) if message.metadata else {}
        for part in message.tensors:
            if part.dtype and pending:  # a part with a dtype starts a new tensor
                tensors.append(deserialize_torch_tensor(combine_from_streaming(pending)))
                pending = []
            pending.append(part)
    if pending:
        tensors.append(deserialize_torch_tensor(combine_from_streaming(pending)))
    return header, tensors


async def unpack_stream(stream: AsyncIterator[Message]) -> tuple[Optional[dict[str, Any]], list[torch.Tensor]]:
    """:func:`unpack` for an async stream of messages."""
    return unpack([message async for message in stream])


def state_to_tensor(state: Any) -> torch.Tensor:
    """Serialize a (nested) state dict of tensors and plain values into one uint8 tensor for streaming."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def tensor_to_state(tensor: torch.Tensor) -> Any:
    """Inverse of :func:`state_to_tensor`. Loads with ``weights_only=True``: tensors and plain values only."""
    return torch.load(io.BytesIO(tensor.numpy().tobytes()), weights_only=True, map_location="cpu")
