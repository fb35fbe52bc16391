"""A trainer's connection to the swarm: its DHT node, the stage directory as it sees it, and the leases on the
experts it claims."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional, Sequence

from lightning_distqat.config import SwarmConfig
from lightning_distqat.swarm.dht import AsyncRunner, start_dht
from hivemind.utils import get_dht_time

from lightning_distqat.swarm.records import (MAX_GONE, ExpertRecord, experts_key, gone_key, local_owner_key,
                                              read_directory)
from lightning_distqat.swarm.remote import ExpertError, ExpertHandle

__all__ = ["SwarmClient", "rank_candidates", "PipelineUnavailableError"]

log = logging.getLogger(__name__)


class PipelineUnavailableError(RuntimeError):
    """No complete pipeline could be claimed: some stage has no free expert with the right fingerprint."""


def rank_candidates(records: Sequence[ExpertRecord], fingerprint: str) -> list[ExpertRecord]:
    """The experts worth claiming for a stage, best first: matching fingerprint, free before leased, newer shared
    state (outer-step version) before older, faster before slower."""
    usable = [r for r in records if r.fingerprint == fingerprint]
    return sorted(usable, key=lambda r: (r.leased, -r.version, -r.throughput, r.peer_id))


class SwarmClient:
    """A trainer's connection to the swarm. No side effects until :meth:`start`."""

    def __init__(self, config: SwarmConfig) -> None:
        self.config = config
        self.dht = None
        self.p2p = None
        self.runner: Optional[AsyncRunner] = None
        self.held: dict[str, ExpertHandle] = {}
        self.gone: set[str] = set()
        """Peer ids of experts this trainer saw die or leave: never claimed again."""
        self._renew_stop = threading.Event()
        self._renewer: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, **dht_kwargs: Any) -> "SwarmClient":
        """Start this trainer's DHT node (joining ``initial_peers``; ``dht_kwargs`` go to hivemind's DHT, e.g.
        ``identity_path`` for a stable peer id) and its P2P handle; on failure nothing is left running."""
        if self.config.announce_maddrs:
            dht_kwargs.setdefault("announce_maddrs", list(self.config.announce_maddrs))
        self.dht = start_dht(self.config.initial_peers, host_maddrs=self.config.host_maddrs,
                             experiment=self.config.experiment, access_token=self.config.access_token, **dht_kwargs)
        try:
            self.runner = AsyncRunner(name="distqat-trainer-p2p").start()
            self.p2p = self.runner.run(self.dht.replicate_p2p(), timeout=30)
        except BaseException:
            self.shutdown()
            raise
        return self

    @property
    def peer_id(self) -> str:
        """This trainer's identity in the swarm (its DHT node's libp2p peer id): the holder of its leases."""
        assert self.dht is not None, "SwarmClient.start() was not called"
        return self.dht.peer_id.to_base58()

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
    def directory(self, stage: Optional[str] = None) -> list[ExpertRecord]:
        """Experts currently announcing ``stage`` (every stage if None). Records that do not parse are skipped (with a
        debug line): nothing a stranger stores can make a trainer fail."""
        assert self.dht is not None
        records = read_directory(self.dht, experts_key(self.config.experiment), ExpertRecord.from_dict)
        return [r for r in records if stage is None or r.stage == stage]

    def handle(self, stage: str, peer_id: str) -> ExpertHandle:
        """A handle on the expert ``peer_id`` for ``stage`` (``ValueError`` if the peer id does not parse)."""
        assert self.p2p is not None and self.runner is not None
        return ExpertHandle(stage, peer_id, self.p2p, self.runner, timeout=self.config.request_timeout,
                            access=self.config.access_token, experiment=self.config.experiment,
                            shared_memory=self.config.shared_memory, sessions=self.config.sessions)

    def claim_pipeline(self, fingerprints: dict[str, str]) -> dict[str, ExpertHandle]:
        """Claim one free expert per stage whose fingerprint matches, waiting up to ``discovery_timeout``. The expert
        itself confirms its stage and fingerprint when it grants the lease (a record could lie).

        Raises :class:`PipelineUnavailableError` naming the stages still missing and what was found for them.
        """
        from tqdm.auto import tqdm

        deadline = time.monotonic() + self.config.discovery_timeout
        seen: dict[str, list[ExpertRecord]] = {}
        poll = threading.Event()
        bar = None
        try:
            while True:
                for stage, fingerprint in fingerprints.items():
                    if stage in self.held:
                        continue
                    seen[stage] = [r for r in self.directory(stage) if r.peer_id not in self.gone]
                    for record in rank_candidates(seen[stage], fingerprint):
                        handle = self._try_claim(stage, fingerprint, record)
                        if handle is not None:
                            self.held[stage] = handle
                            break
                missing = [s for s in fingerprints if s not in self.held]
                if bar is not None:
                    bar.n = len(fingerprints) - len(missing)
                    bar.set_postfix_str(f"missing {missing}" if missing else "", refresh=True)
                if not missing:
                    break
                if time.monotonic() >= deadline:
                    raise PipelineUnavailableError(self._describe_missing(missing, fingerprints, seen))
                if bar is None:  # the first pass found no complete pipeline: say what it waits for
                    log.info("waiting up to %.0f s for free experts of %s (%d of %d stages claimed)",
                             deadline - time.monotonic(), missing, len(fingerprints) - len(missing), len(fingerprints))
                    bar = tqdm(total=len(fingerprints), initial=len(fingerprints) - len(missing), unit="stage",
                               desc="claiming a pipeline", disable=None, leave=False)
                poll.wait(min(1.0, max(0.0, deadline - time.monotonic())))
        finally:
            if bar is not None:
                bar.close()
        self._start_renewal()
        return dict(self.held)

    def replace_expert(self, stage: str, fingerprint: str, gone: ExpertHandle, timeout: float,
                       cause: str = "gone") -> ExpertHandle:
        """Claim another free expert of ``stage`` with ``fingerprint`` in place of ``gone`` (which is never claimed
        again), waiting up to ``timeout`` seconds for one to appear. Raises :class:`PipelineUnavailableError` naming
        the stage when none comes."""
        self.gone.add(gone.peer_id)
        if self.held.get(stage) is gone:
            del self.held[stage]
        self._tell_gone(timeout)
        self._release(gone, timeout=2)  # a leaving expert waits for its holder to let go
        log.warning("stage '%s': expert …%s %s, waiting up to %.0f s for a replacement", stage, gone.peer_id[-8:],
                    cause, timeout)
        deadline = time.monotonic() + timeout
        poll = threading.Event()
        records: list[ExpertRecord] = []
        while True:
            records = [r for r in self.directory(stage) if r.peer_id not in self.gone]
            for record in rank_candidates(records, fingerprint):
                if record.leased:
                    break  # ranked after every free one: nothing left to try this time
                handle = self._try_claim(stage, fingerprint, record)
                if handle is not None:
                    self.held[stage] = handle
                    return handle
            if time.monotonic() >= deadline:
                free = sum(1 for r in records if r.fingerprint == fingerprint and not r.leased)
                raise PipelineUnavailableError(
                    f"stage '{stage}': expert …{gone.peer_id[-8:]} is {cause} and no free expert with fingerprint "
                    f"{fingerprint} could be claimed within failover_timeout={timeout:.0f}s ({len(records)} others "
                    f"announced, {free} of them free). Start more experts for this stage (distqat-expert), or "
                    "spare_experts=k for an embedded swarm.")
            poll.wait(min(1.0, max(0.0, deadline - time.monotonic())))

    def _tell_gone(self, ttl: float) -> None:
        """Publish (signed, under this trainer's own subkey) the experts it saw die or leave, so that experts placing
        themselves do not count them while their records have not expired yet."""
        try:
            self.dht.store(gone_key(self.config.experiment), subkey=local_owner_key(),
                           value={"peers": sorted(self.gone)[-MAX_GONE:]},
                           expiration_time=get_dht_time() + max(ttl, 60.0))
        except Exception:  # noqa: BLE001 - a hint only: placement still works once the records expire
            log.debug("could not publish the gone experts", exc_info=True)

    def _try_claim(self, stage: str, fingerprint: str, record: ExpertRecord) -> Optional[ExpertHandle]:
        try:
            handle = self.handle(stage, record.peer_id)
        except Exception as e:  # noqa: BLE001 - a record whose peer id does not parse: skipped
            log.debug("skipping an expert record with a bad peer id %r: %s", record.peer_id, e)
            return None
        try:
            reply = handle.claim(self.config.lease_ttl, timeout=10)
        except ExpertError as e:
            log.info("could not claim %s: %s", handle, e)
            return None
        if not reply.get("granted"):
            return None
        if reply.get("stage") != stage or reply.get("fingerprint") != fingerprint:
            log.warning("expert …%s was announced for stage '%s' but serves '%s' (fingerprint %s); skipped",
                        record.peer_id[-8:], stage, reply.get("stage"), reply.get("fingerprint"))
            self._release(handle)
            return None
        return handle

    def _describe_missing(
        self, missing: list[str], fingerprints: dict[str, str], seen: dict[str, list[ExpertRecord]]
    ) -> str:
        lines = [f"no free expert for stages {missing} within {self.config.discovery_timeout:.0f}s:"]
        for stage in missing:
            records = seen.get(stage, [])
            other = sorted({r.fingerprint for r in records if r.fingerprint != fingerprints[stage]})
            leased = [r for r in records if r.fingerprint == fingerprints[stage] and r.leased]
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
                    if not handle.claim(self.config.lease_ttl, timeout=10)["granted"]:
                        log.warning("lost the lease on %s", handle)
                except ExpertError as e:
                    log.warning("could not renew the lease on %s: %s", handle, e)

    @staticmethod
    def _release(handle: ExpertHandle, timeout: float = 5) -> None:
        try:
            handle.release(timeout=timeout)
        except ExpertError:
            pass  # a dead expert's lease expires on its own
        handle.close()

    def release_all(self) -> None:
        """Stop renewing and give every lease back."""
        self._renew_stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=15)
            self._renewer = None
        for handle in self.held.values():
            self._release(handle)
        self.held = {}
