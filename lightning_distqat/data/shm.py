"""Batches in shared memory: the server writes a batch's tensors into a slot (one POSIX shared-memory segment), the
trainer maps the segment by name and copies them out.

Segments are named ``distqat_data_<server pid>_<n>`` so that what a dead server left behind can be found and removed.
Only the server creates and unlinks segments; multiprocessing's resource tracker of the server's process tree unlinks
them if the server is killed. Trainers map segments without registering them, so a trainer that dies frees nothing.
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
from collections import OrderedDict
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import torch

__all__ = ["SEGMENT_PREFIX", "Slot", "SharedTensors", "SegmentReader", "segments_of", "remove_segments_of"]

SEGMENT_PREFIX = "distqat_data_"
_ALIGN = 64
_counter = itertools.count()

Layout = list[tuple[str, str, tuple[int, ...], int, int]]
"""Per tensor: key, dtype name, shape, byte offset, byte length."""


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _create(size: int) -> shared_memory.SharedMemory:
    name = f"{SEGMENT_PREFIX}{os.getpid()}_{next(_counter)}"
    return shared_memory.SharedMemory(name=name, create=True, size=max(_ALIGN, size))


def _unlink(shm: shared_memory.SharedMemory) -> None:
    try:
        shm.close()
    except BufferError:  # a view is still alive somewhere in this process; the unlink below still frees the name
        pass
    try:
        shm.unlink()
    except FileNotFoundError:
        pass


def _np_dtype(name: str) -> np.dtype:
    return torch.empty(0, dtype=getattr(torch, name)).numpy().dtype


class SharedTensors:
    """Row-major tensors ``[rows, ...]`` in one segment of the server, filled chunk by chunk: a transformed split
    that every trainer of the machine gathers its batches from."""

    def __init__(self, rows: int, example: dict[str, torch.Tensor]) -> None:
        self.rows = rows
        self.layout: Layout = []
        offset = 0
        for key, t in example.items():
            row_shape = tuple(t.shape[1:])
            nbytes = rows * t[:1].numel() * t.element_size()
            self.layout.append((key, str(t.dtype).removeprefix("torch."), (rows, *row_shape), offset, nbytes))
            offset += _aligned(nbytes)
        self._shm = _create(offset)
        self._views = {key: torch.frombuffer(self._shm.buf, dtype=getattr(torch, dtype), count=math.prod(shape),
                                             offset=start).view(shape) if nbytes else None
                       for key, dtype, shape, start, nbytes in self.layout}

    @property
    def name(self) -> str:
        return self._shm.name.lstrip("/")

    def fill(self, start: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write a chunk of transformed rows at ``start``."""
        for key, view in self._views.items():
            if view is not None:
                chunk = tensors[key]
                view[start:start + len(chunk)].copy_(chunk)

    def close(self) -> None:
        self._views.clear()
        _unlink(self._shm)


class Slot:
    """One reusable shared-memory segment of the server; grows (a new segment) when a batch does not fit."""

    def __init__(self) -> None:
        self._shm: shared_memory.SharedMemory | None = None

    @property
    def name(self) -> str:
        assert self._shm is not None
        return self._shm.name.lstrip("/")

    def write(self, tensors: dict[str, torch.Tensor]) -> Layout:
        """Copy ``tensors`` into the segment and return where each one lies."""
        layout: Layout = []
        offset = 0
        tensors = {key: t.detach().contiguous() for key, t in tensors.items()}
        for key, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            layout.append((key, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, nbytes))
            offset += _aligned(nbytes)
        self._ensure(max(offset, _ALIGN))
        buf = self._shm.buf
        for (key, _, _, start, nbytes), t in zip(layout, tensors.values()):
            if nbytes:
                dst = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=start)
                dst.copy_(t.view(-1).view(torch.uint8))
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


class SegmentReader:
    """A trainer's view of the server's segments: maps them by name (a few at a time) and copies batches out."""

    def __init__(self, keep: int = 16) -> None:
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()
        self._keep = keep

    def _map(self, name: str) -> mmap.mmap:
        if name in self._maps:
            self._maps.move_to_end(name)
            return self._maps[name]
        fd = os.open(f"/dev/shm/{name}", os.O_RDONLY)
        try:
            m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._maps[name] = m
        while len(self._maps) > self._keep:
            self._maps.popitem(last=False)[1].close()
        return m

    def read(self, name: str, layout: Layout) -> dict[str, Any]:
        """Copies of the tensors that ``layout`` describes in segment ``name``."""
        m = self._map(name)
        out: dict[str, Any] = {}
        for key, dtype, shape, start, nbytes in layout:
            raw = torch.from_numpy(np.frombuffer(m, dtype=np.uint8, count=nbytes, offset=start).copy())
            out[key] = raw.view(getattr(torch, dtype)).view(shape)
        return out

    def gather(self, name: str, layout: Layout, ids: list[int]) -> dict[str, Any]:
        """Copies of rows ``ids`` of the :class:`SharedTensors` that ``layout`` describes in segment ``name``."""
        m = self._map(name)
        index = np.asarray(ids, dtype=np.int64)
        out: dict[str, Any] = {}
        for key, dtype, shape, start, nbytes in layout:
            rows = np.frombuffer(m, dtype=_np_dtype(dtype), count=math.prod(shape), offset=start).reshape(shape)
            out[key] = torch.from_numpy(rows[index])
        return out

    def close(self) -> None:
        while self._maps:
            self._maps.popitem()[1].close()


def segments_of(pid: int) -> list[str]:
    """Names of the segments that the server process ``pid`` created and that still exist."""
    prefix = f"{SEGMENT_PREFIX}{pid}_"
    try:
        return sorted(e for e in os.listdir("/dev/shm") if e.startswith(prefix))
    except OSError:
        return []


def remove_segments_of(pid: int) -> list[str]:
    """Unlink the segments left by a server process ``pid`` that is known to be dead; returns their names."""
    removed = []
    for name in segments_of(pid):
        try:
            os.unlink(f"/dev/shm/{name}")
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed
