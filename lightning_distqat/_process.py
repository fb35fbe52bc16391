"""Process lifecycle helpers: no process of ours outlives its owner. Standard library only, so that every process
(experts, the data server's child, hivemind's background processes) can use them without importing torch or
Lightning."""

from __future__ import annotations

import ctypes
import os
import select
import signal
import threading
from typing import BinaryIO, Optional

__all__ = ["die_with_parent", "exit_with_parent", "remove_wire_slots", "WIRE_SLOT_PREFIX", "terminate_children", "kill_process_group", "is_shm_manager",
           "frame", "read_frame"]

_PR_SET_PDEATHSIG = 1
_FRAME_HEADER = 8


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the owner's shutdown is the only clean-up
        pass


def is_shm_manager(pid: int) -> bool:
    """Whether ``pid`` is a torch_shm_manager. hivemind shares memory with torch's file_system strategy, whose manager
    unlinks a process tree's /dev/shm segments once its clients are gone; killing it leaks them, so it is spared."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == "torch_shm_manager"
    except OSError:
        return False


def terminate_children(sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to every direct child of this process except torch_shm_manager (read from /proc; no-op where
    /proc is missing)."""
    pids: set[int] = set()
    try:
        for tid in os.listdir(f"/proc/{os.getpid()}/task"):
            with open(f"/proc/{os.getpid()}/task/{tid}/children") as f:
                pids.update(int(p) for p in f.read().split())
    except OSError:
        return
    for pid in pids:
        if not is_shm_manager(pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def exit_with_parent(parent_pid: int, period: float = 0.5) -> None:
    """Start a daemon thread that ends this process (after sending SIGTERM to its children, p2pd among them) as soon
    as ``parent_pid`` is no longer its parent.

    A parent-death signal alone is not enough for hivemind's background processes: its Python handler runs only when
    the main thread executes bytecode, and their main thread can stay blocked in C (uvloop, a pipe) for good. The
    thread waits on a pidfd of the parent where Linux offers one, else it checks every ``period`` seconds.
    """

    def _end() -> None:
        terminate_children(signal.SIGTERM)
        remove_wire_slots(parent_pid)  # the shared-memory slots a killed parent could not unlink
        os._exit(0)

    try:
        pidfd: Optional[int] = os.pidfd_open(parent_pid)  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        pidfd = None
    if os.getppid() != parent_pid:  # the parent is already gone (or the pidfd names a recycled pid)
        _end()

    def _watch() -> None:
        if pidfd is not None:
            select.select([pidfd], [], [])  # readable once the parent has exited
            _end()
        stop = threading.Event()
        while not stop.wait(period):
            if os.getppid() != parent_pid:
                _end()

    threading.Thread(target=_watch, name="distqat-orphan-watchdog", daemon=True).start()


WIRE_SLOT_PREFIX = "distqat_wire_"
"""Names of the shared-memory slots of calls between trainers and experts: ``distqat_wire_<owner pid>_<n>``."""


def remove_wire_slots(pid: int) -> None:
    """Unlink the shared-memory slots that process ``pid`` owned (call once it is dead)."""
    prefix = f"{WIRE_SLOT_PREFIX}{pid}_"
    try:
        names = [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        try:
            os.unlink(f"/dev/shm/{name}")
        except OSError:
            pass


def kill_process_group(pgid: Optional[int]) -> None:
    """SIGKILL every process of group ``pgid`` except torch_shm_manager (it exits by itself once its clients are gone,
    unlinking their shared memory)."""
    if pgid is None:
        return
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                group = int(f.read().rsplit(")", 1)[1].split()[2])
        except (OSError, ValueError, IndexError):
            continue
        if group == pgid and not is_shm_manager(int(entry)):
            try:
                os.kill(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass


def frame(data: bytes) -> bytes:
    """``data`` as one length-prefixed frame for a pipe (see :func:`read_frame`)."""
    return len(data).to_bytes(_FRAME_HEADER, "big") + data


def read_frame(stream: BinaryIO) -> bytes:
    """One frame written by :func:`frame`; ``EOFError`` if the stream ends before it is whole."""
    header = stream.read(_FRAME_HEADER)
    if len(header) < _FRAME_HEADER:
        raise EOFError("the pipe closed before a frame arrived")
    size = int.from_bytes(header, "big")
    data = stream.read(size)
    if len(data) < size:
        raise EOFError(f"a frame arrived cut short ({len(data)} of {size} bytes)")
    return data
