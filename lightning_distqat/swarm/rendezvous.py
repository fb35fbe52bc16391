"""Rendezvous of the trainer processes that one ``Trainer(devices=N)`` launches on this machine.

Lightning's launcher gives every rank the same ``MASTER_ADDR``/``MASTER_PORT`` (meant for torch.distributed, which
the strategy does not initialise). Rank 0 hosts a ``torch.distributed.TCPStore`` there, which needs no process group:
it publishes the multiaddrs of its DHT node (or its failure), the other ranks join through them and wait for rank 0's
embedded experts before they claim theirs. With DiLoCo all ranks meet before the first training step, so that the
first round finds every replica. At the end every other rank says it is done, and rank 0 waits for that before it
stops the embedded experts that the others still use (and the store with them).

A TCP port on this machine is open to every local user, so what rank 0 publishes (where its DHT node is, whether
its experts started) carries an HMAC under a secret that the ranks share through their environment
(``DISTQAT_RENDEZVOUS_SECRET``, set by the launching process before Lightning starts the other ranks); a value
without the right HMAC is refused. Marks (who is done, who has started) are presence only: a local user who writes
them can make a launch stop or start early, not make it use another swarm.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from datetime import timedelta
from typing import Iterable

from torch.distributed import DistError, DistStoreError, TCPStore

__all__ = ["Rendezvous", "SECRET_VARIABLE", "ensure_secret"]

SECRET_VARIABLE = "DISTQAT_RENDEZVOUS_SECRET"


def ensure_secret() -> None:
    """Make sure the ranks that this process launches (they inherit its environment) share a rendezvous secret."""
    os.environ.setdefault(SECRET_VARIABLE, secrets.token_hex(16))


class Rendezvous:
    """The ranks of one launch, meeting in rank 0's TCPStore. ``connect`` creates (rank 0) or joins it."""

    def __init__(self, store: TCPStore, rank: int, world_size: int, secret: str) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self._key = hashlib.sha256(f"distqat-rendezvous:{secret}".encode()).digest()

    @classmethod
    def connect(cls, rank: int, world_size: int, timeout: float) -> "Rendezvous":
        """Rank 0 listens at ``MASTER_ADDR:MASTER_PORT``; the others connect, waiting up to ``timeout`` seconds."""
        port = os.environ.get("MASTER_PORT")
        if not port:
            raise RuntimeError(
                "DistqatStrategy: several trainer processes need MASTER_PORT to find each other; launch them with "
                "Trainer(devices=N) (Lightning sets it) or set MASTER_PORT to the same free port in every process"
            )
        secret = os.environ.get(SECRET_VARIABLE)
        if not secret:
            raise RuntimeError(f"DistqatStrategy: several trainer processes need a shared secret in {SECRET_VARIABLE}; "
                               "launch them with Trainer(devices=N) (the strategy sets it) or set it to the same "
                               "random value in every process")
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        try:
            store = TCPStore(host, int(port), world_size, rank == 0, timeout=timedelta(seconds=timeout),
                             wait_for_workers=False)
        except DistError as e:
            if rank == 0:  # the port is taken, or the address is not this machine's
                raise RuntimeError(f"DistqatStrategy (rank 0): cannot host the rendezvous of the ranks at {host}:"
                                   f"{port} ({e}); set MASTER_PORT to a free port") from None
            raise TimeoutError(f"DistqatStrategy (rank {rank}): could not meet rank 0 at {host}:{port} within "
                               f"{timeout:.0f}s ({e})") from None
        return cls(store, rank, world_size, secret)

    def _mac(self, key: str, body: str) -> str:
        return hmac.new(self._key, f"{key}\0{body}".encode(), hashlib.sha256).hexdigest()

    def publish(self, key: str, value: object) -> None:
        """Publish ``value`` (JSON) under ``key`` for the other ranks, with its HMAC."""
        body = json.dumps(value)
        self.store.set(key, json.dumps({"body": body, "mac": self._mac(key, body)}))

    def read(self, key: str, timeout: float) -> object:
        """What rank 0 published under ``key``; ``TimeoutError`` if nothing comes within ``timeout`` seconds,
        ``RuntimeError`` if what came does not carry the ranks' HMAC."""
        if self.wait([key], timeout):
            raise TimeoutError(f"rank 0 did not publish {key!r} within {timeout:.0f}s")
        try:
            sealed = json.loads(self.store.get(key))
            if hmac.compare_digest(sealed["mac"], self._mac(key, sealed["body"])):
                return json.loads(sealed["body"])
        except (ValueError, KeyError, TypeError):
            pass
        raise RuntimeError(f"DistqatStrategy (rank {self.rank}): the rendezvous value {key!r} was not written by rank 0 "
                           f"of this launch (another process wrote to its port, or {SECRET_VARIABLE} differs)")

    def mark(self, name: str) -> None:
        """Leave the mark ``name`` for the other ranks (``experts``, ``started-1``, ``done-1``...)."""
        self.store.set(name, "1")

    def wait(self, names: Iterable[str], timeout: float) -> list[str]:
        """Wait until every mark in ``names`` is there; returns those still missing after ``timeout`` seconds."""
        names = list(names)
        try:
            self.store.wait(names, timedelta(seconds=max(0.001, timeout)))
            return []
        except DistStoreError:
            return [name for name in names if not self.store.check([name])]

    def barrier(self, name: str, timeout: float) -> list[int]:
        """Every rank marks ``name`` and waits for all the others; returns the ranks that did not come in time."""
        self.mark(f"{name}-{self.rank}")
        late = self.wait([f"{name}-{r}" for r in range(self.world_size)], timeout)
        return [int(n.rsplit("-", 1)[1]) for n in late]

    def leave(self, timeout: float) -> list[int]:
        """Ranks 1..N-1 say they are done; rank 0 waits for them. Returns the ranks rank 0 stopped waiting for."""
        if self.rank > 0:
            self.mark(f"done-{self.rank}")
            return []
        late = self.wait([f"done-{r}" for r in range(1, self.world_size)], timeout)
        return [int(n.rsplit("-", 1)[1]) for n in late]
