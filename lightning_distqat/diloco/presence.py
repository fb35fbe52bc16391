"""Which replicas of a DiLoCo group are alive: each replica's heartbeat in the DHT.

hivemind's matchmaking cannot tell a replica that is slow (still in its inner steps) from one that died: a replica
left alone waits ``averaging_timeout`` in every round for a partner that will never come. So every replica stores a
small record under ``<group prefix>_replicas`` every ``period`` seconds (it expires after ``3 x period``), and a
record saying it left when it shuts down; the same thread reads the others' records and keeps what it saw, so a
round never waits on the DHT. A replica that has seen others alive and has seen none for ``grace`` seconds (their
heartbeats stopped or they said they left, and no replacement came) is *deserted*: its rounds apply its own
pseudo-gradient at once, and a round still looking for a group gives up. A replica that has never seen another one
waits as before (a partner may be starting).

Each record's subkey is this process's ``[owner:...]`` marker (hivemind signs the record with it) followed by the
averager's peer id. Nothing binds that peer id to the signer, so a peer counts as alive if any record says so: a
stranger's "left" record for someone cannot end that one's heartbeat, and a stranger's fake heartbeat only costs the
wait there was before.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any, Optional

from hivemind.utils.timed_storage import get_dht_time

from lightning_distqat.swarm.records import MAX_RECORD_TTL, local_owner_key

__all__ = ["Presence", "live_peers", "presence_key"]

log = logging.getLogger(__name__)

_SUBKEY = re.compile(rb"\[owner:[^\]]+\]([1-9A-HJ-NP-Za-km-z]{1,128})")
"""A presence subkey: one owner marker, then a base58 peer id."""


def presence_key(prefix: str) -> str:
    return f"{prefix}_replicas"


def live_peers(found: Any) -> Optional[set[str]]:
    """The peer ids whose heartbeat is in ``found`` (what ``dht.get(presence_key, latest=True)`` returned) and says
    alive; None when nothing could be read. Malformed records are ignored."""
    if found is None or not isinstance(getattr(found, "value", None), dict):
        return None
    alive = set()
    for subkey, item in found.value.items():
        value = getattr(item, "value", None)
        if not isinstance(subkey, bytes) or not isinstance(value, dict) or value.get("alive") is not True:
            continue
        match = _SUBKEY.fullmatch(subkey)
        if match is not None:
            alive.add(match.group(1).decode("ascii"))
    return alive


class Presence:
    """This replica's heartbeat (a daemon thread) and what it last saw of the others'."""

    def __init__(self, dht: Any, prefix: str, me: str, period: float, grace: float) -> None:
        self._dht, self._key, self.me, self.period, self.grace = dht, presence_key(prefix), me, period, grace
        self._subkey = local_owner_key() + me.encode("ascii")
        self._ttl = min(3 * period, MAX_RECORD_TTL - 2)
        self.seen_partner = False
        """Whether another replica has been seen alive."""
        self._alone_since: Optional[float] = None
        """When this replica last went from seeing partners (or not knowing) to seeing none (monotonic)."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="distqat-diloco-presence", daemon=True)

    def start(self) -> "Presence":
        self._announce(True)
        self.refresh()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the heartbeat and say this replica left."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.period + 10)
        self._announce(False)

    def _announce(self, alive: bool) -> None:
        # the "left" record expires after the last heartbeat would have (hivemind keeps the later expiration)
        expires = get_dht_time() + self._ttl + (0.0 if alive else 1.0)
        try:
            stored = self._dht.store(self._key, {"alive": alive}, expires, subkey=self._subkey,
                                     return_future=True).result(timeout=max(self.period, 5.0))
        except Exception:  # noqa: BLE001 - a slow or stopped DHT: the record expires by itself
            log.debug("DiLoCo presence: could not store the record under %s", self._key, exc_info=True)
            return
        if not stored:
            log.debug("DiLoCo presence: no DHT peer took the record under %s", self._key)

    def _beat(self) -> None:
        while not self._stop.wait(self.period):
            self._announce(True)
            self.refresh()

    def refresh(self) -> Optional[set[str]]:
        """Read the others' heartbeats now (the heartbeat thread does, every period): the other replicas alive, or
        None when that is unknown (the DHT could not be read in time, or this replica's own heartbeat is not in what
        it read: an incomplete lookup)."""
        try:
            alive = live_peers(self._dht.get(self._key, latest=True, return_future=True)
                               .result(timeout=max(self.period, 5.0)))
        except Exception:  # noqa: BLE001 - unknown, so nobody is declared gone
            log.debug("DiLoCo presence: could not read %s", self._key, exc_info=True)
            alive = None
        if alive is not None and self.me not in alive:
            alive = None
        with self._lock:
            if alive is None:
                return None
            alive.discard(self.me)
            if alive:
                self.seen_partner = True
                self._alone_since = None
            elif self._alone_since is None:
                self._alone_since = time.monotonic()
            return alive

    def deserted(self) -> bool:
        """Whether this replica has seen partners, and has seen none alive for ``grace`` seconds (as of the last
        reading)."""
        with self._lock:
            return (self.seen_partner and self._alone_since is not None
                    and time.monotonic() - self._alone_since >= self.grace)
