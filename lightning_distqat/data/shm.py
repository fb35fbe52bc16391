"""Batches in shared memory: the server writes a batch's arrays into a slot (one POSIX shared-memory segment), the
trainer maps the segment by name and copies them out (``client.SegmentReader``). Numpy only: the server's process
needs no torch.

Segments are named ``distqat_data_<server pid>_<n>`` (the transformed splits, made by the server's loader process:
``distqat_data_<server pid>_<loader tag>_<n>``), so that what a dead server left behind can be found and removed. The
server unlinks them all; multiprocessing's resource tracker of the server's process unlinks them if the server is
killed (the loader's own tracker, if the loader dies before it hands them over). Trainers map segments without
registering them, so a trainer that dies frees nothing.
"""

from __future__ import annotations

import itertools
import os
from multiprocessing import shared_memory

import numpy as np

__all__ = ["SEGMENT_PREFIX", "Layout", "Slot", "SharedTensors", "segment_prefix", "segments_of", "remove_segments_of"]

SEGMENT_PREFIX = "distqat_data_"
_ALIGN = 64
_counter = itertools.count()

Layout = list[tuple[str, str, tuple[int, ...], int, int]]
"""Per array: key, dtype name (numpy's, which torch shares for these dtypes), shape, byte offset, byte length."""


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _create(size: int, prefix: str | None = None) -> shared_memory.SharedMemory:
    """A new segment; its name starts with ``prefix`` (default ``distqat_data_<this pid>_``): the process whose pid
    it names unlinks it."""
    name = f"{prefix or segment_prefix(os.getpid())}{next(_counter)}"
    return shared_memory.SharedMemory(name=name, create=True, size=max(_ALIGN, size))


def segment_prefix(pid: int, tag: str = "") -> str:
    """How the names of process ``pid``'s segments start (``tag`` sets some of them apart)."""
    return f"{SEGMENT_PREFIX}{pid}_{tag + '_' if tag else ''}"


def _unlink(shm: shared_memory.SharedMemory) -> None:
    try:
        shm.close()
    except BufferError:  # a view is still alive somewhere in this process; the unlink below still frees the name
        pass
    try:
        shm.unlink()
    except FileNotFoundError:
        pass


class SharedTensors:
    """Row-major arrays ``[rows, ...]`` in one segment of the server, filled chunk by chunk: a transformed split
    that every trainer of the machine gathers its batches from.

    ``SharedTensors.create(rows, example, prefix)`` makes the segment (the data loader's process does, naming it after
    the server that will own it); ``SharedTensors.attach(name, layout)`` opens it in the server, which registers it
    with its resource tracker and unlinks it at shutdown."""

    def __init__(self, shm: shared_memory.SharedMemory, layout: Layout) -> None:
        self._shm, self.layout = shm, layout
        self._views = {key: np.ndarray(shape, dtype=np.dtype(dtype), buffer=shm.buf, offset=start)
                       if nbytes else None for key, dtype, shape, start, nbytes in layout}

    @classmethod
    def create(cls, rows: int, example: dict[str, np.ndarray], prefix: str | None = None) -> "SharedTensors":
        """A new segment for ``rows`` rows shaped like ``example``'s (a batch of the transform); see :func:`_create`
        for ``prefix``."""
        layout: Layout = []
        offset = 0
        for key, a in example.items():
            nbytes = rows * a[:1].nbytes
            layout.append((key, str(a.dtype), (rows, *a.shape[1:]), offset, nbytes))
            offset += _aligned(nbytes)
        return cls(_create(offset, prefix), layout)

    @classmethod
    def attach(cls, name: str, layout: Layout) -> "SharedTensors":
        """Open segment ``name``, made by :meth:`create` with ``layout``, as its owner."""
        return cls(shared_memory.SharedMemory(name=name), [(k, d, tuple(s), o, n) for k, d, s, o, n in layout])

    @property
    def name(self) -> str:
        return self._shm.name.lstrip("/")

    def fill(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Write a chunk of transformed rows at ``start``."""
        for key, view in self._views.items():
            if view is not None:
                chunk = arrays[key]
                view[start:start + len(chunk)] = chunk

    def close(self) -> None:
        """Unlink the segment."""
        self._views.clear()
        _unlink(self._shm)

    def detach(self) -> None:
        """Let go of the segment without unlinking it (it is another process's now)."""
        from multiprocessing import resource_tracker

        self._views.clear()
        self._shm.close()
        resource_tracker.unregister(self._shm._name, "shared_memory")  # type: ignore[attr-defined]


class Slot:
    """One reusable shared-memory segment of the server; grows (a new segment) when a batch does not fit."""

    def __init__(self) -> None:
        self._shm: shared_memory.SharedMemory | None = None

    @property
    def name(self) -> str:
        assert self._shm is not None
        return self._shm.name.lstrip("/")

    def write(self, arrays: dict[str, np.ndarray]) -> Layout:
        """Copy ``arrays`` into the segment and return where each one lies."""
        layout: Layout = []
        offset = 0
        arrays = {key: np.ascontiguousarray(a) for key, a in arrays.items()}
        for key, a in arrays.items():
            layout.append((key, str(a.dtype), tuple(a.shape), offset, a.nbytes))
            offset += _aligned(a.nbytes)
        self._ensure(max(offset, _ALIGN))
        for (key, _, _, start, nbytes), a in zip(layout, arrays.values()):
            if nbytes:
                np.ndarray(a.shape, dtype=a.dtype, buffer=self._shm.buf, offset=start)[...] = a
        return layout

    def _ensure(self, size: int) -> None:
        if self._shm is not None and self._shm.size >= size:
            return
        self.close()
        self._shm = _create(_aligned(size + size // 4))

    def close(self) -> None:
        """Unlink the segment (a trainer that still maps it keeps its pages until it unmaps)."""
        if self._shm is None:
            return
        shm, self._shm = self._shm, None
        _unlink(shm)


def segments_of(pid: int, tag: str = "") -> list[str]:
    """Names of the segments of the server process ``pid`` (with ``tag``, if given) that still exist."""
    prefix = segment_prefix(pid, tag)
    try:
        return sorted(e for e in os.listdir("/dev/shm") if e.startswith(prefix))
    except OSError:
        return []


def remove_segments_of(pid: int, tag: str = "") -> list[str]:
    """Unlink the segments of process ``pid`` (with ``tag``, if given) that nobody will unlink; returns their
    names."""
    removed = []
    for name in segments_of(pid, tag):
        try:
            os.unlink(f"/dev/shm/{name}")
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed
