"""How a call crosses the wire: a small msgpack header plus a list of tensors, split into a stream of hivemind
``ExpertRequest``/``ExpertResponse`` messages so that no single message exceeds the P2P size limit."""

from __future__ import annotations

import asyncio
import io
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Iterator, Optional, Sequence, Type, TypeVar, Union

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils.nested import nested_flatten, nested_pack
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

if TYPE_CHECKING:
    from lightning_distqat.swarm.sharedwire import SlotReader

__all__ = ["CHUNK_BYTES", "LINGER_SECONDS", "linger", "pack", "unpack", "collect", "unpack_stream", "TooLarge",
           "Malformed", "small", "state_to_parts", "parts_to_state", "state_to_tensor", "tensor_to_state", "flatten_structure", "pack_structure", "LayoutError"]

PLAIN = (int, float, bool, str, type(None))
"""Values that travel inside a call's header, next to its tensors."""


class LayoutError(TypeError):
    """A call (or a stage's output) holds something that cannot cross the wire."""


def _check_tree(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise LayoutError(f"{where} has a dict key {key!r} ({type(key).__name__}); only str keys travel")
            _check_tree(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_tree(item, f"{where}[{i}]")
    elif not isinstance(value, (torch.Tensor, *PLAIN)):
        raise LayoutError(f"{where} is a {type(value).__name__}; tensors, plain values (int, float, bool, str, None) "
                          "and tuples, lists and str-keyed dicts of them travel")


def flatten_structure(value: Any, where: str = "value") -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Split a nested structure (tuples, lists, str-keyed dicts) into a msgpack-able layout and its tensors, in the
    order of hivemind's ``nested_flatten``. Plain values stay in the layout. Raises :class:`LayoutError` naming
    ``where`` for anything else. Named tuples arrive as plain tuples."""
    _check_tree(value, where)
    leaves = list(nested_flatten(value))
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    kinds = ["t" if isinstance(leaf, torch.Tensor) else ["v", leaf] for leaf in leaves]
    skeleton = nested_pack([None] * len(leaves), value)
    return {"tree": skeleton, "leaves": kinds}, tensors


def pack_structure(layout: dict[str, Any], tensors: Sequence[torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_structure`. Raises ``ValueError`` when the tensors do not match the layout."""
    kinds = layout["leaves"]
    wanted = sum(1 for kind in kinds if kind == "t")
    if wanted != len(tensors):
        raise ValueError(f"the layout names {wanted} tensors but {len(tensors)} came with it")
    it = iter(tensors)
    leaves = [next(it) if kind == "t" else kind[1] for kind in kinds]
    return nested_pack(leaves, layout["tree"])

CHUNK_BYTES = 2**20
"""Bytes of tensor data per streamed message (well under hivemind's 4 MiB per-message limit)."""

Message = Union[runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse]
M = TypeVar("M", runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse)


def pack(kind: Type[M], header: dict[str, Any], tensors: Sequence[torch.Tensor] = ()) -> Iterator[M]:
    """Yield messages of type ``kind``: the first carries the header, the tensors follow in chunks. The header also
    says how many messages make up the whole call (``"_n"``), so that the receiver knows when it has all of it."""
    parts: list[runtime_pb2.Tensor] = []
    for tensor in tensors:
        serialized = serialize_torch_tensor(tensor.detach().cpu().contiguous())
        parts.extend(split_for_streaming(serialized, CHUNK_BYTES))
    batches: list[list[runtime_pb2.Tensor]] = [[]]
    budget = 0
    for part in parts:
        if batches[-1] and budget + len(part.buffer) > CHUNK_BYTES:
            batches.append([])
            budget = 0
        batches[-1].append(part)
        budget += len(part.buffer)
    header_bytes = MSGPackSerializer.dumps({**header, "_n": len(batches)})
    for i, batch in enumerate(batches):
        yield kind(metadata=header_bytes if i == 0 else b"", tensors=batch)


class Malformed(ValueError):
    """A call that does not follow the wire format."""


def _tensor(parts: list[runtime_pb2.Tensor]) -> torch.Tensor:
    serialized = combine_from_streaming(parts)
    if serialized.compression != runtime_pb2.CompressionType.NONE:  # our codecs travel as plain tensors
        raise Malformed("compressed tensors are not accepted in a call")
    return deserialize_torch_tensor(serialized).requires_grad_(False)


def unpack(messages: Iterable[Message], shared: Optional["SlotReader"] = None, max_bytes: int = 2**40
           ) -> tuple[Optional[dict[str, Any]], list[torch.Tensor]]:
    """Inverse of :func:`pack`: the header and the tensors, in order. The header is None if the call did not arrive
    whole (no message, or fewer than the header announced: a stream that the other side closed early). Raises
    :class:`Malformed` for anything that does not follow the format.

    A header with a shared-memory ticket (``"shm"``, see ``sharedwire``) has its tensors copied out of the sender's
    slot by ``shared`` (at most ``max_bytes``); without a reader such a call is refused."""
    messages = list(messages)
    if not messages:
        return None, []
    try:
        header = MSGPackSerializer.loads(messages[0].metadata) if messages[0].metadata else {}
        if not isinstance(header, dict):
            raise Malformed(f"the header is a {type(header).__name__}, not a dict")
        if len(messages) < header.pop("_n", 1):
            return None, []
        if "shm" in header:
            if shared is None:
                raise Malformed("this peer does not take tensors through shared memory")
            if any(message.tensors for message in messages):
                raise Malformed("a call through shared memory carries no tensor bytes")
            return header, shared.read(header.pop("shm"), max_bytes)
        tensors: list[torch.Tensor] = []
        pending: list[runtime_pb2.Tensor] = []
        for message in messages:
            for part in message.tensors:
                if part.dtype and pending:  # a part with a dtype starts a new tensor
                    tensors.append(_tensor(pending))
                    pending = []
                pending.append(part)
        if pending:
            tensors.append(_tensor(pending))
    except Malformed:
        raise
    except Exception as e:  # noqa: BLE001 - anything a stranger can send: msgpack, protobuf and numpy errors
        raise Malformed(f"the call cannot be read ({type(e).__name__}: {e})") from None
    return header, tensors


def small(messages: Sequence[Message], limit: int) -> bool:
    """True when a call's messages and the tensors of its shared-memory ticket (if any) hold fewer than ``limit``
    bytes: reading it costs little. False for anything that cannot be told quickly (a malformed ticket included)."""
    if sum(message.ByteSize() for message in messages) >= limit:
        return False
    try:
        header = MSGPackSerializer.loads(messages[0].metadata) if messages and messages[0].metadata else {}
        ticket = header.get("shm") if isinstance(header, dict) else None
        return ticket is None or sum(int(item[3]) for item in ticket["items"]) < limit
    except Exception:  # noqa: BLE001 - unpack names what is wrong
        return False


class TooLarge(ValueError):
    """A call announced or sent more messages or bytes than the receiver accepts."""


async def collect(stream: AsyncIterator[Message], *, max_messages: int = 2**20, max_bytes: int = 2**40,
                  check: Optional[Callable[[dict[str, Any]], None]] = None, keep_open: bool = False
                  ) -> list[Message]:
    """Read exactly the messages that the first one announces, then close ``stream`` (a caller closes its side once
    it has the whole answer; see :func:`linger`). Raises :class:`TooLarge` as soon as the announced count exceeds
    ``max_messages`` or the bytes read exceed ``max_bytes``: nothing more is read. ``check(header)`` runs on the
    first message's header before anything else is read; whatever it raises ends the read the same way."""
    messages: list[Message] = []
    expected, received = 1, 0
    whole = False
    try:
        async for message in stream:
            received += message.ByteSize()  # every field: empty parts cost memory too
            if received > max_bytes:
                raise TooLarge(f"the call is larger than {max_bytes} bytes")
            if not messages:
                try:
                    header = MSGPackSerializer.loads(message.metadata) if message.metadata else {}
                    expected = int(header.get("_n", 1))
                except Exception as e:  # noqa: BLE001 - whatever a stranger sent: a malformed header
                    raise TooLarge(f"the call's header cannot be read ({type(e).__name__})") from None
                if not 1 <= expected <= max_messages:
                    raise TooLarge(f"the call announces {expected} messages; at most {max_messages} are accepted")
                if check is not None:
                    check(header)
            messages.append(message)
            if len(messages) >= expected:
                break
        whole = True
    finally:
        if not (keep_open and whole):
            await _close(stream)
    return messages


async def _close(stream: AsyncIterator[Message]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


async def unpack_stream(stream: AsyncIterator[Message], shared: Optional["SlotReader"] = None
                        ) -> tuple[Optional[dict[str, Any]], list[torch.Tensor]]:
    """:func:`unpack` of :func:`collect`; the stream closes after the tensors were copied out of the sender's
    shared-memory slot (the sender reuses the slot once the stream closed)."""
    messages = await collect(stream, keep_open=True)
    try:
        return unpack(messages, shared)
    finally:
        await _close(stream)


LINGER_SECONDS = 60.0
"""How long the answering side keeps a stream open after its last message, waiting for the caller to close it."""


async def linger(messages: Iterable[M], seconds: float = LINGER_SECONDS) -> AsyncIterator[M]:
    """Yield ``messages`` as a streamed answer, then keep the stream open until the caller closes it (the handler is
    cancelled then) or ``seconds`` pass.

    Why: when the answering side closes a hivemind stream, its p2pd resets the libp2p stream right after the last
    data, and the caller's p2pd discards whatever it had received but not yet handed on (yamux drops buffered data on
    reset). Under load that lost whole answers. The caller closes first instead, once it has every message."""
    for message in messages:
        yield message
    await asyncio.sleep(seconds)


MAX_STATE_DEPTH = 16
"""How deep a state's nesting may go on the wire (module -> optimizers -> index -> state -> name -> key is 6)."""


def state_to_parts(state: Any) -> tuple[list[Any], list[torch.Tensor]]:
    """A state (nested dicts with str or int keys, lists, tuples, tensors and plain values: what ``get_state``
    returns) as a msgpack-able skeleton and its tensors, so that the tensors travel as tensors (through shared memory
    on one host) instead of inside one ``torch.save`` blob. Raises :class:`LayoutError` for anything else."""
    tensors: list[torch.Tensor] = []

    def walk(value: Any, depth: int) -> list[Any]:
        if depth > MAX_STATE_DEPTH:
            raise LayoutError(f"a state nested deeper than {MAX_STATE_DEPTH} levels")
        if isinstance(value, torch.Tensor):
            tensors.append(value.detach())
            return ["t", len(tensors) - 1]
        if isinstance(value, dict):
            if any(not isinstance(k, (str, int)) or isinstance(k, bool) for k in value):
                raise LayoutError("a state dict has a key that is neither str nor int")
            return ["d", [[k, walk(v, depth + 1)] for k, v in value.items()]]
        if isinstance(value, (list, tuple)):
            return ["l" if isinstance(value, list) else "u", [walk(v, depth + 1) for v in value]]
        if isinstance(value, PLAIN):
            return ["v", value]
        raise LayoutError(f"a state holds a {type(value).__name__}")

    return walk(state, 0), tensors


def parts_to_state(skeleton: Any, tensors: Sequence[torch.Tensor]) -> Any:
    """Inverse of :func:`state_to_parts`. Raises :class:`Malformed` for a skeleton that does not fit (wrong tags,
    keys or nesting, a tensor index out of range or used twice)."""
    used: set[int] = set()

    def build(node: Any, depth: int) -> Any:
        if depth > MAX_STATE_DEPTH or not isinstance(node, list) or len(node) != 2:
            raise Malformed("a state's skeleton is made of [tag, value] pairs at most 16 deep")
        tag, value = node
        if tag == "t":
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(tensors) or value in used:
                raise Malformed(f"a state names tensor {value!r:.20} of {len(tensors)}")
            used.add(value)
            return tensors[value]
        if tag == "v":
            if not isinstance(value, PLAIN):
                raise Malformed("a state's plain value is not int, float, bool, str or None")
            return value
        if tag in ("l", "u") and isinstance(value, list):
            items = [build(v, depth + 1) for v in value]
            return items if tag == "l" else tuple(items)
        if tag == "d" and isinstance(value, list):
            out: dict[Any, Any] = {}
            for item in value:
                if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], (str, int))
                        and not isinstance(item[0], bool)):
                    raise Malformed("a state dict's items are [str or int key, value] pairs")
                out[item[0]] = build(item[1], depth + 1)
            return out
        raise Malformed(f"a state's skeleton has tag {tag!r:.20}")

    state = build(skeleton, 0)
    if len(used) != len(tensors):
        raise Malformed(f"a state came with {len(tensors)} tensors and names {len(used)}")
    return state


def state_to_tensor(state: Any) -> torch.Tensor:
    """Serialize a (nested) state dict of tensors and plain values into one uint8 tensor for streaming."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def tensor_to_state(tensor: torch.Tensor) -> Any:
    """Inverse of :func:`state_to_tensor`. Loads with ``weights_only=True``: tensors and plain values only."""
    return torch.load(io.BytesIO(tensor.numpy().tobytes()), weights_only=True, map_location="cpu")
