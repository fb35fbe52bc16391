"""A trainer's side of the data server: one connection per split, batches copied out of shared memory."""

from __future__ import annotations

import math
import mmap
import os
import socket
import threading
import time
from collections import OrderedDict
from typing import Any, Iterator, Optional

import numpy as np
import torch

from lightning_distqat.data.errors import DataServerError, DataSourceError
from lightning_distqat.data.shm import SEGMENT_PREFIX, Layout
from lightning_distqat.data.wire import WireError, recv, send

__all__ = ["DataClient", "SegmentReader"]


class SegmentReader:
    """A trainer's view of the server's segments: maps them by name (a few at a time, read-only, without registering
    them: a trainer that dies frees nothing) and copies batches out as torch tensors."""

    def __init__(self, keep: int = 16) -> None:
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()
        self._keep = keep

    def _map(self, name: str) -> mmap.mmap:
        if not (isinstance(name, str) and name.startswith(SEGMENT_PREFIX) and name.replace("_", "").isalnum()):
            raise DataServerError(f"the data server named a segment {name!r} that is not one of its own")
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

    def _array(self, name: str, dtype: str, shape: tuple[int, ...], start: int) -> np.ndarray:
        return np.frombuffer(self._map(name), dtype=np.dtype(dtype), count=math.prod(shape), offset=start
                             ).reshape(shape)

    def read(self, name: str, layout: Layout) -> dict[str, torch.Tensor]:
        """Copies of the arrays that ``layout`` describes in segment ``name``."""
        return {key: torch.from_numpy(self._array(name, dtype, shape, start).copy())
                for key, dtype, shape, start, _ in layout}

    def gather(self, name: str, layout: Layout, ids: list[int]) -> dict[str, torch.Tensor]:
        """Copies of rows ``ids`` of the ``SharedTensors`` that ``layout`` describes in segment ``name``."""
        index = np.asarray(ids, dtype=np.int64)
        return {key: torch.from_numpy(self._array(name, dtype, shape, start)[index])
                for key, dtype, shape, start, _ in layout}

    def close(self) -> None:
        while self._maps:
            self._maps.popitem()[1].close()


class DataClient:
    """Talk to the data server at ``address`` as trainer ``trainer_id``.

    Every request waits at most ``request_timeout`` seconds; when that fires, :class:`DataServerError` is raised (raise
    the timeout for slow transforms or very large batches, or check that the server is alive).
    """

    def __init__(self, address: str, trainer_id: int = 0, *, request_timeout: float = 120.0) -> None:
        self.address = address
        self.trainer_id = trainer_id
        self.request_timeout = request_timeout
        self._sock: Optional[socket.socket] = None
        self._reader = SegmentReader()
        self._cache: Optional[tuple] = None

    def connect(self, timeout: float = 0.0) -> "DataClient":
        """Connect, retrying for up to ``timeout`` seconds while the server is starting."""
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.address)
                break
            except OSError as e:
                sock.close()
                if time.monotonic() >= deadline:
                    raise DataServerError(f"no data server answers at {self.address} ({e}); start one with "
                                          f"`distqat-data` or let SharedMemoryDataModule start its own") from None
                pause.wait(0.1)
        sock.settimeout(self.request_timeout)
        self._sock = sock
        return self

    def _request(self, message: tuple) -> list:
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        try:
            send(self._sock, list(message))
            reply = recv(self._sock)
        except socket.timeout:
            self.close()
            raise DataServerError(f"the data server at {self.address} did not answer {message[0]!r} within "
                                  f"request_timeout={self.request_timeout}s") from None
        except (EOFError, OSError, WireError) as e:
            self.close()
            raise DataServerError(f"lost the data server at {self.address} ({type(e).__name__}: {e}); it stopped or "
                                  "was killed") from None
        if reply[0] == "error":
            cls = DataSourceError if reply[1] == "DataSourceError" else DataServerError
            raise cls(reply[2])
        return reply

    def info(self) -> dict[str, Any]:
        """What the server serves: its config key, rows and batches per split, number of trainers."""
        return self._request(("info",))[1]

    def start(self, split: str, epoch: int) -> tuple[int, int]:
        """Begin ``split`` of ``epoch``; returns (batches of this trainer in the epoch, how many it already did)."""
        _, total, done, self._cache = self._request(("start", self.trainer_id, split, epoch))
        return total, done

    def batches(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(batch index, batch) of the started stream until it ends. Each batch is a private copy."""
        while True:
            reply = self._request(("next",))
            if reply[0] == "end":
                return
            if reply[0] == "rows":  # a cached split: gather the rows from the server's one transformed copy
                _, index, ids = reply
                batch = self._reader.gather(*self._cache, ids)
                batch["sample_ids"] = torch.tensor(ids, dtype=torch.int64)
                yield index, batch
                continue
            _, index, name, layout = reply
            yield index, self._reader.read(name, layout)

    def ack(self, epoch: int, index: int) -> None:
        """Tell the server this trainer finished training on batch ``index`` of ``epoch`` (no reply)."""
        if self._sock is None:
            raise DataServerError(f"cannot acknowledge batch {index}: not connected to {self.address}")
        try:
            send(self._sock, ["ack", self.trainer_id, epoch, index])
        except OSError as e:
            raise DataServerError(f"lost the data server at {self.address} ({e})") from None

    def close(self) -> None:
        self._reader.close()
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None
