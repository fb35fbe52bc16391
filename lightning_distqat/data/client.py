"""A trainer's side of the data server: one connection per split, batches copied out of shared memory."""

from __future__ import annotations

import socket
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Iterator, Optional

import torch

from lightning_distqat.data.errors import DataServerError, DataSourceError
from lightning_distqat.data.shm import SegmentReader

__all__ = ["DataClient"]


class DataClient:
    """Talk to the data server at ``address`` as trainer ``trainer_id``.

    Every request waits at most ``request_timeout`` seconds; when that fires, :class:`DataServerError` is raised (raise
    the timeout for slow transforms or very large batches, or check that the server is alive).
    """

    def __init__(self, address: str, trainer_id: int = 0, *, request_timeout: float = 120.0) -> None:
        self.address = address
        self.trainer_id = trainer_id
        self.request_timeout = request_timeout
        self._conn: Optional[Connection] = None
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
        self._conn = Connection(sock.detach())
        return self

    def _request(self, message: tuple) -> tuple:
        if self._conn is None:
            self.connect()
        try:
            self._conn.send(message)
            if not self._conn.poll(self.request_timeout):
                raise DataServerError(f"the data server at {self.address} did not answer {message[0]!r} within "
                                      f"request_timeout={self.request_timeout}s")
            reply = self._conn.recv()
        except (EOFError, OSError) as e:
            self.close()
            raise DataServerError(f"lost the data server at {self.address} ({type(e).__name__}); it stopped or was "
                                  f"killed") from None
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
        if self._conn is None:
            raise DataServerError(f"cannot acknowledge batch {index}: not connected to {self.address}")
        try:
            self._conn.send(("ack", self.trainer_id, epoch, index))
        except OSError as e:
            raise DataServerError(f"lost the data server at {self.address} ({e})") from None

    def close(self) -> None:
        self._reader.close()
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass
            self._conn = None
