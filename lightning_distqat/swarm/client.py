"""A trainer's connection to the swarm: its DHT node, the stage directory as it sees it, and the leases on the
experts it claims."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Optional, Sequence

from lightning_distqat.config import SwarmConfig
from lightning_distqat.swarm.dht import AsyncRunner, start_dht
from lightning_distqat.swarm.records import ExpertRecord, RecordError, stage_key
from lightning_distqat.swarm.remote import ExpertError, ExpertHandle

__all__ = ["SwarmClient", "rank_candidates", "PipelineUnavailableError"]

log = logging.getLogger(__name__)


class PipelineUnavailableError(RuntimeError):
    """No complete pipeline could be claimed: some stage has no free expert with the right fingerprint."""


def rank_candidates(records: Sequence[ExpertRecord], fingerprint: str, trainer_id: str) -> list[ExpertRecord]:
    """The experts worth claiming for a stage, best first: matching fingerprint, free (or ours) before leased, newer
    shared state (outer-step version) before older, faster before slower."""
    usable = [r for r in records if r.fingerprint == fingerprint]
    return sorted(usable, key=lambda r: (r.lease_holder not in (None, trainer_id), -r.version, -r.throughput,
                                         r.peer_id))


class SwarmClient:
    """A trainer's connection to the swarm. No side effects until :meth:`start`."""

    def __init__(self, config: SwarmConfig, *, trainer_id: Optional[str] = None) -> None:
        self.config = config
        self.trainer_id = trainer_id or f"trainer-{uuid.uuid4().hex[:12]}"
        self.dht = None
        self.p2p = None
        self.runner: Optional[AsyncRunner] = None
        self.held: dict[str, ExpertHandle] = {}
        self._renew_stop = threading.Event()
        self._renewer: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "SwarmClient":
        """Start this trainer's DHT node (joining ``initial_peers``) and its P2P handle; on failure nothing is left
        running."""
        self.dht = start_dht(self.config.initial_peers, host_maddrs=self.config.host_maddrs)
        try:
            self.runner = AsyncRunner(name="distqat-trainer-p2p").start()
            self.p2p = self.runner.run(self.dht.replicate_p2p(), timeout=30)
        except BaseException:
            self.shutdown()
            raise
        return self

    @property
    def visible_maddrs(self) -> list[str]:
        assert self.dht is not None, "SwarmClient.start() was not called"
        return [str(m) for m in self.dht.get_visible_maddrs()]

    def shutdown(self) -> None:
        """Release leases, then stop the renewal thread, the P2P handle and the DHT node (reverse of start)."""
        self.release_all()
        if self.runner is not None:
            if self.p2p is not None:
                try:
                    self.runner.run(self.p2p.shutdown(), timeout=10)
                except Exception:  # noqa: BLE001 - the daemon belongs to the DHT node, which is stopped next
                    log.debug("closing the P2P replica failed", exc_info=True)
            self.runner.shutdown()
        if self.dht is not None:
            self.dht.shutdown()
        self.dht = self.p2p = self.runner = None

    # ------------------------------------------------------------------ directory and leases
    def directory(self, stage: str) -> list[ExpertRecord]:
        """Experts currently announcing ``stage`` (malformed records are skipped with a warning)."""
        assert self.dht is not None
        found = self.dht.get(stage_key(self.config.experiment, stage), latest=True)
        if found is None or not isinstance(found.value, dict):
            return []
        records = []
        for subkey, item in found.value.items():
            try:
                record = ExpertRecord.from_dict(item.value)
                if record.peer_id != subkey or record.stage != stage:
                    raise RecordError(f"record for {record.peer_id}/{record.stage} stored under {subkey}/{stage}")
                records.append(record)
            except RecordError as e:
                log.warning("ignoring a malformed record for stage '%s': %s", stage, e)
        return records

    def handle(self, stage: str, peer_id: str) -> ExpertHandle:
        assert self.p2p is not None and self.runner is not None
        return ExpertHandle(stage, peer_id, self.p2p, self.runner, timeout=self.config.request_timeout,
                            trainer_id=self.trainer_id)

    def claim_pipeline(self, fingerprints: dict[str, str]) -> dict[str, ExpertHandle]:
        """Claim one free expert per stage whose fingerprint matches, waiting up to ``discovery_timeout``.

        Raises :class:`PipelineUnavailableError` naming the stages still missing and what was found for them.
        """
        deadline = time.monotonic() + self.config.discovery_timeout
        seen: dict[str, list[ExpertRecord]] = {}
        poll = threading.Event()
        while True:
            for stage, fingerprint in fingerprints.items():
                if stage in self.held:
                    continue
                seen[stage] = self.directory(stage)
                for record in rank_candidates(seen[stage], fingerprint, self.trainer_id):
                    handle = self.handle(stage, record.peer_id)
                    try:
                        granted = handle.claim(self.trainer_id, self.config.lease_ttl, timeout=10)["granted"]
                    except ExpertError as e:
                        log.info("could not claim %s: %s", handle, e)
                        continue
                    if granted:
                        self.held[stage] = handle
                        break
            missing = [s for s in fingerprints if s not in self.held]
            if not missing:
                break
            if time.monotonic() >= deadline:
                raise PipelineUnavailableError(self._describe_missing(missing, fingerprints, seen))
            poll.wait(min(1.0, max(0.0, deadline - time.monotonic())))
        self._start_renewal()
        return dict(self.held)

    def _describe_missing(
        self, missing: list[str], fingerprints: dict[str, str], seen: dict[str, list[ExpertRecord]]
    ) -> str:
        lines = [f"no free expert for stages {missing} within {self.config.discovery_timeout:.0f}s:"]
        for stage in missing:
            records = seen.get(stage, [])
            other = sorted({r.fingerprint for r in records if r.fingerprint != fingerprints[stage]})
            leased = [r for r in records if r.fingerprint == fingerprints[stage] and r.lease_holder]
            lines.append(
                f"  '{stage}' (fingerprint {fingerprints[stage]}): {len(records)} announced, {len(leased)} leased to "
                f"other trainers, other fingerprints {other or 'none'}"
            )
        lines.append("Start experts for these stages (distqat-expert) or check experiment name and initial_peers.")
        return "\n".join(lines)

    def _start_renewal(self) -> None:
        if self._renewer is not None:
            return
        self._renew_stop.clear()
        self._renewer = threading.Thread(target=self._renew_loop, name="distqat-lease-renewal", daemon=True)
        self._renewer.start()

    def _renew_loop(self) -> None:
        while not self._renew_stop.wait(self.config.lease_ttl / 3):
            for handle in list(self.held.values()):
                try:
                    if not handle.claim(self.trainer_id, self.config.lease_ttl, timeout=10)["granted"]:
                        log.warning("lost the lease on %s", handle)
                except ExpertError as e:
                    log.warning("could not renew the lease on %s: %s", handle, e)

    def release_all(self) -> None:
        self._renew_stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=15)
            self._renewer = None
        for handle in self.held.values():
            try:
                handle.release(self.trainer_id, timeout=5)
            except ExpertError:
                pass  # a dead expert's lease expires on its own
        self.held = {}
