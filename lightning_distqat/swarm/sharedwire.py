"""Tensors through shared memory between a trainer and an expert on the same host.

The sender writes a call's tensors into one of its slots (a POSIX shared-memory segment it owns) and sends only a
ticket in the message header: the segment's name, a 16-byte key and (dtype, shape, offset, bytes) per tensor. The
receiver maps the segment, checks the key, copies the tensors out and checks the key again: the owner zeroes a slot's
key before it writes the slot anew and sets a fresh random key after, so a slot reused while it was read is noticed
(the read fails; it is never silently mixed), and a peer that did not get the ticket cannot name a slot (it does not
know the key). Peers on other hosts get bytes as before.

When a slot is free again: a trainer's request slot once its call returned (the expert copies the request before it
computes); an expert's answer slot once the caller closed the stream (the caller copies before it closes, see
``messages.unpack_stream``). A slot whose call failed is retired (unlinked, never reused), so a late reader of it
finds the old bytes or nothing.

No /dev/shm entry outlives its owner for long: an arena unlinks its segments when it closes; their names
(``distqat_wire_<pid>_<n>``) let whoever started a process remove what it left once it is dead
(:func:`remove_segments_of`: the embedded swarm does so for its experts); the watchdog thread of every hivemind
process we start (DHT node, averager: ``_process.exit_with_parent``) removes its parent's slots when the parent dies,
so a SIGKILLed trainer or expert leaves nothing; and every new arena first removes the slots of processes that are
gone (:func:`remove_orphans`).
"""

from __future__ import annotations

import itertools
import mmap
import os
import threading
from collections import OrderedDict
from hashlib import sha256
from typing import Any, Optional, Sequence

import numpy as np
import torch

from lightning_distqat._process import WIRE_SLOT_PREFIX, remove_wire_slots
from lightning_distqat.swarm.messages import Malformed

__all__ = ["SEGMENT_PREFIX", "Arena", "Slot", "SlotReader", "SharedWireError", "host_key", "remove_segments_of",
           "remove_orphans", "MIN_SHARED_BYTES"]

SEGMENT_PREFIX = WIRE_SLOT_PREFIX
KEY_BYTES = 16
_ALIGN = 64
_MIN_SLOT = 2**16
MIN_SHARED_BYTES = 2**12
"""Calls with fewer tensor bytes than this travel as bytes: below it a slot saves less than it costs."""

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool)}
_counter = itertools.count()


class SharedWireError(Malformed):
    """A ticket that cannot be read: malformed, out of bounds, or its slot was reused or removed meanwhile."""


def host_key() -> str:
    """Who can share memory with this process: the same boot of the same machine and the same user."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        return ""
    return sha256(f"{boot}:{os.uname().nodename}:{os.getuid()}".encode()).hexdigest()[:32]


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def remove_segments_of(pid: int) -> None:
    """Unlink the slots that process ``pid`` left behind (call once it is dead)."""
    remove_wire_slots(pid)


def remove_orphans() -> None:
    """Unlink the slots of processes of this user that are gone (killed before they could unlink their own)."""
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return
    pids = {int(n[len(SEGMENT_PREFIX):].split("_")[0]) for n in names
            if n.startswith(SEGMENT_PREFIX) and n[len(SEGMENT_PREFIX):].split("_")[0].isdigit()}
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            remove_segments_of(pid)
        except PermissionError:  # another user's process: alive
            pass


def _room_for(size: int) -> bool:
    """Whether /dev/shm has room for ``size`` more bytes, twice over (writing past a full tmpfs is SIGBUS)."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize > 2 * size


class Slot:
    """One segment of an arena, written by its owner only (mode 0600: only this user maps it)."""

    def __init__(self, size: int) -> None:
        self.name = f"{SEGMENT_PREFIX}{os.getpid()}_{next(_counter)}"
        fd = os.open(f"/dev/shm/{self.name}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(f"/dev/shm/{self.name}")
            raise
        finally:
            os.close(fd)
        self.size = size
        self.bytes: Optional[torch.Tensor] = torch.frombuffer(self._map, dtype=torch.uint8)

    def write(self, tensors: Sequence[torch.Tensor]) -> dict[str, Any]:
        """Write ``tensors`` (after a zeroed key, before a fresh one); returns the ticket."""
        self.bytes[:KEY_BYTES].zero_()
        items, offset = [], _ALIGN
        for tensor in tensors:
            tensor = tensor.detach().cpu().contiguous()
            nbytes = tensor.numel() * tensor.element_size()
            if nbytes:
                self.bytes[offset:offset + nbytes].copy_(tensor.reshape(-1).view(torch.uint8))
            items.append([str(tensor.dtype).removeprefix("torch."), list(tensor.shape), offset, nbytes])
            offset = _aligned(offset + nbytes)
        key = os.urandom(KEY_BYTES)
        self.bytes[:KEY_BYTES].copy_(torch.frombuffer(bytearray(key), dtype=torch.uint8))
        return {"seg": self.name, "key": key, "items": items}

    def close(self) -> None:
        if self.bytes is None:
            return
        self.bytes = None
        try:
            self._map.close()
        except BufferError:  # a view is still alive in this process; the unlink below still frees the name
            pass
        try:
            os.unlink(f"/dev/shm/{self.name}")
        except FileNotFoundError:
            pass


class Arena:
    """The slots one sender owns (one per trainer-expert pair on the trainer's side, one per expert on its side).
    Slots are segments of 2^k bytes, reused when free; at most ``max_bytes`` in all (a call that does not fit travels
    as bytes)."""

    def __init__(self, max_bytes: int = 2**30) -> None:
        remove_orphans()
        self.max_bytes = max_bytes
        self._free: dict[int, list[Slot]] = {}
        self._busy: set[Slot] = set()
        self._total = 0
        self._lock = threading.Lock()
        self._closed = False

    @staticmethod
    def needed(tensors: Sequence[torch.Tensor]) -> int:
        return _ALIGN + sum(_aligned(t.numel() * t.element_size()) for t in tensors)

    def write(self, tensors: Sequence[torch.Tensor]) -> Optional[tuple[Slot, dict[str, Any]]]:
        """A free slot with ``tensors`` in it and its ticket, or None when they are too few bytes to be worth it,
        their dtype does not travel this way, or the arena is full."""
        if sum(t.numel() * t.element_size() for t in tensors) < MIN_SHARED_BYTES:
            return None
        if any(str(t.dtype).removeprefix("torch.") not in _DTYPES for t in tensors):
            return None
        size = max(_MIN_SLOT, 1 << (self.needed(tensors) - 1).bit_length())
        with self._lock:
            if self._closed:
                return None
            free = self._free.get(size)
            if free:
                slot = free.pop()
            else:
                if self._total + size > self.max_bytes or not _room_for(size):
                    return None
                slot = Slot(size)
                self._total += size
            self._busy.add(slot)
        return slot, slot.write(tensors)

    def release(self, slot: Slot) -> None:
        """``slot`` may be written again (its reader has copied it)."""
        with self._lock:
            self._busy.discard(slot)
            if self._closed:
                slot.close()
            else:
                self._free.setdefault(slot.size, []).append(slot)

    def retire(self, slot: Slot) -> None:
        """``slot`` may still be read by someone who gave up on it: unlink it, never reuse it."""
        with self._lock:
            self._busy.discard(slot)
            self._total -= slot.size
        slot.close()

    def close(self) -> None:
        """Unlink every slot (a busy one as soon as it is released)."""
        with self._lock:
            self._closed = True
            free = [s for slots in self._free.values() for s in slots]
            self._free.clear()
            busy = list(self._busy)
            self._busy.clear()
        for slot in free + busy:
            slot.close()


class SlotReader:
    """Maps the segments that tickets name (read-only, without registering them: a reader that dies frees nothing;
    at most ``keep`` at a time, least recently used unmapped first) and copies tensors out of them."""

    def __init__(self, keep: int = 32) -> None:
        self.keep = keep
        self._mapped: OrderedDict[str, mmap.mmap] = OrderedDict()
        self._lock = threading.Lock()

    def _segment(self, name: str) -> np.ndarray:
        with self._lock:
            mapped = self._mapped.pop(name, None)
            if mapped is None:
                try:
                    fd = os.open(f"/dev/shm/{name}", os.O_RDONLY)
                    try:
                        mapped = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
                    finally:
                        os.close(fd)
                except (OSError, ValueError) as e:
                    raise SharedWireError(f"shared-memory slot {name!r} is gone ({type(e).__name__})") from None
                while len(self._mapped) >= self.keep:
                    self._mapped.popitem(last=False)[1].close()
            self._mapped[name] = mapped
            return np.frombuffer(mapped, dtype=np.uint8)

    def read(self, ticket: Any, max_bytes: int) -> list[torch.Tensor]:
        """The tensors of ``ticket`` (copies). Raises :class:`SharedWireError` for a ticket that is malformed,
        larger than ``max_bytes``, out of the segment's bounds, or whose slot was rewritten or removed."""
        try:
            name, key, items = ticket["seg"], ticket["key"], ticket["items"]
            if not (isinstance(name, str) and name.startswith(SEGMENT_PREFIX) and name.replace("_", "").isalnum()
                    and isinstance(key, bytes) and len(key) == KEY_BYTES and isinstance(items, list)):
                raise SharedWireError("a shared-memory ticket names a segment of ours, a 16-byte key and its items")
            specs = []
            for dtype, shape, offset, nbytes in items:
                if dtype not in _DTYPES or not isinstance(shape, list) or len(shape) > 16:
                    raise SharedWireError(f"a shared-memory item has dtype {dtype!r} and shape {shape!r}")
                count = 1
                for n in shape:
                    if not isinstance(n, int) or n < 0:
                        raise SharedWireError(f"a shared-memory item has shape {shape!r}")
                    count *= n
                element = torch.empty(0, dtype=_DTYPES[dtype]).element_size()
                if not (isinstance(offset, int) and isinstance(nbytes, int) and offset >= _ALIGN
                        and nbytes == count * element):
                    raise SharedWireError("a shared-memory item's offset or size does not match its shape")
                specs.append((_DTYPES[dtype], shape, offset, nbytes))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, SharedWireError):
                raise
            raise SharedWireError(f"a shared-memory ticket cannot be read ({type(e).__name__}: {e})") from None
        if sum(s[3] for s in specs) > max_bytes:
            raise SharedWireError(f"the call is larger than {max_bytes} bytes")
        view = self._segment(name)
        if any(offset + nbytes > view.size for _, _, offset, nbytes in specs):
            raise SharedWireError("a shared-memory item lies outside its segment")
        if view[:KEY_BYTES].tobytes() != key:
            raise SharedWireError("the shared-memory slot was rewritten before it was read")
        tensors = [torch.from_numpy(view[offset:offset + nbytes].copy()).view(dtype).view(shape) if nbytes
                   else torch.empty(shape, dtype=dtype) for dtype, shape, offset, nbytes in specs]
        if view[:KEY_BYTES].tobytes() != key:
            raise SharedWireError("the shared-memory slot was rewritten while it was read")
        return tensors

    def close(self) -> None:
        with self._lock:
            mapped, self._mapped = list(self._mapped.values()), OrderedDict()
        for m in mapped:
            try:
                m.close()
            except BufferError:  # a view of it is alive: unmapped when that view goes
                pass
