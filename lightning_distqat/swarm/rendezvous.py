"""Rendezvous of the trainer processes that one ``Trainer(devices=N)`` launches on this machine.

Rank 0 publishes the multiaddrs of its DHT node in a folder named after the launch (Lightning's launcher gives every
rank the same ``MASTER_PORT``); the other ranks wait for them and join. At the end every other rank marks itself done,
and rank 0 waits for that before it stops the embedded experts that the others still use.
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
        path = self.folder / "peers"
        self._wait(lambda: path.exists(), timeout, f"rank 0 did not publish its swarm address in {path}")
        return json.loads(path.read_text())

    def mark_done(self, rank: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"done-{rank}").touch()

    def wait_done(self, ranks: Iterable[int], timeout: float) -> list[int]:
        """Wait until every rank in ``ranks`` is done; returns the ranks that were not done in time."""
        ranks = list(ranks)

        def missing() -> list[int]:
            return [r for r in ranks if not (self.folder / f"done-{r}").exists()]

        try:
            self._wait(lambda: not missing(), timeout, "")
        except TimeoutError:
            pass
        return missing()

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    @staticmethod
    def _wait(condition, timeout: float, message: str) -> None:  # noqa: ANN001
        deadline, poll = time.monotonic() + timeout, threading.Event()
        while not condition():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{message} within {timeout:.0f}s")
            poll.wait(0.2)
