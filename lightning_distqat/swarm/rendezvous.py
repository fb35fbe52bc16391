"""Rendezvous of the trainer processes that one ``Trainer(devices=N)`` launches on this machine.

Rank 0 publishes the multiaddrs of its DHT node in a folder named after the launch (Lightning's launcher gives every
rank the same ``MASTER_PORT``); the other ranks wait for them and join, and wait for rank 0's embedded experts before
they claim theirs. All ranks meet before the first training step, so that DiLoCo's first round finds every replica.
At the end every other rank marks itself done, and rank 0 waits for that before it stops the embedded experts that
the others still use.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable

__all__ = ["Rendezvous"]


class Rendezvous:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @classmethod
    def for_launch(cls, experiment: str) -> "Rendezvous":
        port = os.environ.get("MASTER_PORT")
        if not port:
            raise RuntimeError(
                "DistqatStrategy: several trainer processes need MASTER_PORT to find each other; launch them with "
                "Trainer(devices=N) (Lightning sets it) or set MASTER_PORT to the same free port in every process"
            )
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in experiment)
        return cls(Path(tempfile.gettempdir()) / f"distqat-{safe}-{port}")

    def publish(self, peers: list[str]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / "peers.tmp"
        tmp.write_text(json.dumps(peers))
        tmp.replace(self.folder / "peers")  # atomic: readers see all or nothing

    def wait_peers(self, timeout: float) -> list[str]:
        """The multiaddrs rank 0 published; ``TimeoutError`` if they do not appear within ``timeout`` seconds."""
        if self.wait_marks(["peers"], timeout):
            raise TimeoutError(f"rank 0 did not publish its swarm address in {self.folder / 'peers'} within "
                               f"{timeout:.0f}s")
        return json.loads((self.folder / "peers").read_text())

    def mark(self, name: str) -> None:
        """Leave the mark ``name`` for the other ranks (``done-1``, ``experts``, ``started-0``, ...)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / name).touch()

    def wait_marks(self, names: Iterable[str], timeout: float) -> list[str]:
        """Wait until every mark in ``names`` is there; returns those still missing after ``timeout`` seconds."""
        names = list(names)

        def missing() -> list[str]:
            return [n for n in names if not (self.folder / n).exists()]

        deadline, poll = time.monotonic() + timeout, threading.Event()
        while missing() and time.monotonic() < deadline:
            poll.wait(0.2)
        return missing()

    def mark_done(self, rank: int) -> None:
        self.mark(f"done-{rank}")

    def wait_done(self, ranks: Iterable[int], timeout: float) -> list[int]:
        """Wait until every rank in ``ranks`` is done; returns the ranks that were not done in time."""
        return [int(name.removeprefix("done-")) for name in self.wait_marks([f"done-{r}" for r in ranks], timeout)]

    def barrier(self, name: str, rank: int, world_size: int, timeout: float) -> list[int]:
        """Every rank marks ``name`` and waits for all the others; returns the ranks that did not come in time."""
        self.mark(f"{name}-{rank}")
        late = self.wait_marks([f"{name}-{r}" for r in range(world_size)], timeout)
        return [int(n.rsplit("-", 1)[1]) for n in late]

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
