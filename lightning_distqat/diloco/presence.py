"""Which replicas of a DiLoCo group are alive: each replica's heartbeat in the DHT.

hivemind's matchmaking cannot tell a replica that is slow (still in its inner steps) from one that died: a replica
left alone waits ``averaging_timeout`` in every round for a partner that will never come. So every replica stores a
small record under ``<group prefix>_replicas`` every ``period`` seconds (it expires after ``3 x period``), and a
record saying it left when it shuts down. A replica that has seen others alive and now sees none (their heartbeats
stopped or they said they left) is *deserted*: its rounds apply its own pseudo-gradient at once, and a round already
waiting for a group gives up. A replica that has never seen another one waits as before (a partner may be starting).

Records are signed (the subkey holds this process's ``[owner:...]`` marker followed by the averager's peer id).
Nothing binds that peer id to the signer, so a peer counts as alive if any record says so: a stranger's "left"
record for someone cannot end that one's heartbeat, and a stranger's fake heartbeat only costs the wait there was
before.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional

from hivemind.utils.timed_storage import get_dht_time

from lightning_distqat.swarm.records import local_owner_key

__all__ = ["Presence", "live_peers", "presence_key"]

log = logging.getLogger(__name__)


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
        end = subkey.find(b"]")
        if not subkey.startswith(b"[owner:") or end < 0:
            continue
        try:
            peer = subkey[end + 1:].decode("ascii")
        except UnicodeDecodeError:
            continue
        if 0 < len(peer) <= 128:
            alive.add(peer)
    return alive


class Presence:
    """This replica's heartbeat (a daemon thread) and what it sees of the others'."""

    def __init__(self, dht: Any, prefix: str, me: str, period: float) -> None:
        self._dht, self._key, self.me, self.period = dht, presence_key(prefix), me, period
        self._subkey = local_owner_key() + me.encode("ascii")
        self.seen: set[str] = set()
        """Other replicas seen alive so far."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="distqat-diloco-presence", daemon=True)

    def start(self) -> "Presence":
        self._announce(True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the heartbeat and say this replica left."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._announce(False)

    def _announce(self, alive: bool) -> None:
        # the "left" record expires after the last heartbeat would have (hivemind keeps the later expiration)
        expires = get_dht_time() + 3 * self.period + (0.0 if alive else 1.0)
        try:
            self._dht.store(self._key, {"alive": alive}, expires, subkey=self._subkey)
        except Exception:  # noqa: BLE001 - a DHT that is shutting down: the record expires by itself
            log.debug("DiLoCo presence: could not store the record under %s", self._key, exc_info=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.period):
            self._announce(True)

    def others(self) -> Optional[set[str]]:
        """The other replicas alive now; None when that is unknown (the DHT could not be read, or this replica's
        own heartbeat is not in what it read: an incomplete lookup)."""
        try:
            alive = live_peers(self._dht.get(self._key, latest=True))
        except Exception:  # noqa: BLE001 - unknown, so nobody is declared gone
            log.debug("DiLoCo presence: could not read %s", self._key, exc_info=True)
            return None
        if alive is None or self.me not in alive:
            return None
        alive.discard(self.me)
        self.seen |= alive
        return alive

    def deserted(self) -> bool:
        """Whether every replica this one has seen is gone and none is alive."""
        others = self.others()
        return others is not None and not others and bool(self.seen)
