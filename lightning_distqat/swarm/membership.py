"""A trainer's time in the swarm, from joining to leaving, as one context.

:class:`SwarmMembership` starts, in order: the rendezvous of the ranks of one launch (``devices=N``), the embedded
experts' interpreters (they import while the rest starts), the trainer's DHT node, the experts' stages, the claim of
one expert per stage (the :class:`~lightning_distqat.swarm.pipeline.RemotePipeline`) and later the DiLoCo rounds.
Everything it started is registered in one ``ExitStack``, so a failure half-way stops what was started, and
:meth:`leave` stops it all in reverse order.
"""

from __future__ import annotations

import logging
import time
import traceback
from contextlib import ExitStack
from dataclasses import replace
from typing import Any, Optional, Sequence

import torch
from torch import nn

from lightning_distqat.config import ExpertConfig, QuantConfig, SwarmConfig
from lightning_distqat.diloco.config import DiLoCoConfig
from lightning_distqat.swarm.client import SwarmClient
from lightning_distqat.swarm.embedded import STARTUP_PHASES, EmbeddedSwarm
from lightning_distqat.swarm.pipeline import RemotePipeline
from lightning_distqat.swarm.records import stage_fingerprint
from lightning_distqat.swarm.rendezvous import Rendezvous

__all__ = ["SwarmMembership"]

log = logging.getLogger(__name__)


class SwarmMembership:
    """One trainer's membership: ``join()`` does all of it or nothing; ``leave(bring_home=...)`` undoes it.

    Args:
        config: how to reach the swarm. Without ``initial_peers`` the trainer starts an embedded swarm (rank 0 of a
            ``devices=N`` launch starts N experts per stage, and the other ranks use them).
        originals: the stage submodules, by path (empty: no pipeline, e.g. data-parallel DiLoCo).
        quant: wire codecs and QAT of the stages.
        rank, world_size: this trainer's place in a ``devices=N`` launch.
    """

    def __init__(self, config: SwarmConfig, originals: dict[str, nn.Module], *, quant: Optional[QuantConfig] = None,
                 rank: int = 0, world_size: int = 1) -> None:
        self.config = config
        self.originals = originals
        self.quant = quant
        self.rank, self.world_size = rank, world_size
        self.client: Optional[SwarmClient] = None
        self.embedded: Optional[EmbeddedSwarm] = None
        self.rendezvous: Optional[Rendezvous] = None
        self.pipeline: Optional[RemotePipeline] = None
        self.rounds: Optional[Any] = None
        self.timings: dict[str, float] = {}
        """Seconds the trainer's side of joining took: ``dht`` (its node), ``experts`` (until every embedded expert
        served), ``claim``."""
        self._stack = ExitStack()

    @property
    def joined_swarm(self) -> bool:
        """The user named a running swarm (``initial_peers``) rather than letting this trainer start one."""
        return bool(self.config.initial_peers)

    def join(self) -> "SwarmMembership":
        """Start everything this trainer needs in the swarm (see the module docstring); on any failure, stop what was
        started and raise. With ranks, rank 0's failure reaches the other ranks at once (through the rendezvous), so
        they fail with its cause instead of waiting out ``startup_timeout``."""
        cfg = self.config
        start = time.monotonic()
        with ExitStack() as stack:
            peers = cfg.initial_peers
            if self.world_size > 1 and not self.joined_swarm:
                self.rendezvous = Rendezvous.connect(self.rank, self.world_size, cfg.startup_timeout)
                stack.callback(setattr, self, "rendezvous", None)  # dropping the store closes it
                if self.rank == 0:
                    stack.push(self._tell_ranks_on_failure)
                else:  # says "done" however this ends; rank 0 waits for that before stopping experts
                    stack.callback(self._leave_rendezvous)
                    peers = self._from_rank0("peers")
            if self.originals and not self.joined_swarm and self.rank == 0:
                self.embedded = EmbeddedSwarm(
                    self.originals, replicas=self.world_size + cfg.spare_experts, startup_timeout=cfg.startup_timeout,
                    expert_config=ExpertConfig(experiment=cfg.experiment, host_maddrs=cfg.host_maddrs,
                                               device=cfg.expert_device, access_token=cfg.access_token),
                )
                self.embedded.launch()
                stack.callback(self.embedded.shutdown)
            self.client = SwarmClient(replace(cfg, initial_peers=peers)).start()
            stack.callback(self.client.shutdown)
            self.timings["dht"] = time.monotonic() - start
            if self.rendezvous is not None and self.rank == 0:
                self.rendezvous.publish("peers", {"value": self.client.visible_maddrs})
                stack.push(self._rank0_leaves)  # before the experts stop: the other ranks still use them
            if self.embedded is not None:
                self.embedded.start(self.client.visible_maddrs, trusted_peers=[self.client.peer_id])
                if self.rendezvous is not None:
                    self.rendezvous.publish("experts", {"value": True})
            elif self.rendezvous is not None and self.originals:
                self._from_rank0("experts")
            self.timings["experts"] = time.monotonic() - start - self.timings["dht"]
            if self.originals:
                claimed = time.monotonic()
                fingerprints = {name: stage_fingerprint(m) for name, m in self.originals.items()}
                handles = self.client.claim_pipeline(fingerprints)
                stack.callback(self.client.release_all)
                client = self.client

                def replacer(stage: str, gone: Any, cause: str) -> Any:
                    return client.replace_expert(stage, fingerprints[stage], gone, cfg.failover_timeout, cause)

                self.pipeline = RemotePipeline(self.originals, handles, quant=self.quant, replacer=replacer,
                                               mirror_every=cfg.mirror_every)
                stack.callback(self.pipeline.close)
                if self.joined_swarm and cfg.seed_experts:  # its experts have weights of their own
                    self.pipeline.seed()
                self.timings["claim"] = time.monotonic() - claimed
            self._stack = stack.pop_all()
        return self

    def startup_lines(self) -> list[str]:
        """What joining did, for the start-up log: the embedded swarm (with its slowest expert's start-up split) and
        the pipeline (each stage's parameters and expert)."""
        lines = []
        if self.embedded is not None:
            split = self.embedded.startup_split()
            phases = ", ".join(f"{phase} {split[phase]:.1f}s" for phase in STARTUP_PHASES)
            spares = self.config.spare_experts
            per_stage = (f" ({self.world_size + spares} per stage{f', {spares} spare' if spares else ''})"
                         if self.world_size + spares > 1 else "")
            lines.append(f"embedded swarm up in {self.timings['dht'] + self.timings['experts']:.1f}s, "
                         f"{len(self.embedded.pids)} experts serve {list(self.originals)}{per_stage}; slowest "
                         f"expert: {phases}")
        if self.pipeline is not None:
            lines.append(f"pipeline {self.pipeline.describe()}")
        return lines

    def start_rounds(self, diloco: DiLoCoConfig, local_params: Sequence[torch.Tensor],
                     restore: Optional[dict[str, Any]] = None) -> int:
        """Join the DiLoCo averaging groups: every expert of the pipeline its stage's, the trainer's own parameters
        theirs (``restore``: a checkpoint's outer state, loaded first). With ranks, all of them meet afterwards, so
        that the first round finds every replica. Returns the round the replicas are at."""
        from lightning_distqat.diloco.rounds import TrainerRounds

        assert self.client is not None, "join() first"
        cfg = self.config
        self.rounds = TrainerRounds(
            diloco, handles=self.pipeline.handles if self.pipeline is not None else {},
            local_params=local_params, dht=self.client.dht, experiment=cfg.experiment,
            solo=self.solo, request_timeout=cfg.request_timeout,
            call=self.pipeline.call if self.pipeline is not None else None,
        )
        if self.pipeline is not None:  # a replacement joins its stage's averaging group before it replays
            self.pipeline.on_replaced.append(self.rounds.join_replacement)
        self._stack.callback(self.rounds.finish, keep_outer=False)  # idempotent: stops averaging on any exit
        start = self.rounds.start(restore)
        if self.rendezvous is not None:
            late = self.rendezvous.barrier("started", cfg.startup_timeout)
            if late:
                log.warning("DistqatStrategy: ranks %s did not reach training within %.0fs; going on without "
                            "waiting for them", late, cfg.startup_timeout)
        return start

    def current_experts(self) -> dict[str, dict[str, Any]]:
        """For each stage, the expert the pipeline uses now: its peer id, and its process id if this trainer
        started it (None otherwise)."""
        if self.pipeline is None:
            return {}
        pids = self.embedded.pid_by_peer if self.embedded is not None else {}
        return {stage: {"peer_id": h.peer_id, "pid": pids.get(h.peer_id)} for stage, h in self.pipeline.handles.items()}

    @property
    def solo(self) -> bool:
        """A swarm that this trainer started and told nobody about has no other replicas to wait for."""
        return not self.joined_swarm and self.world_size == 1

    def leave(self, *, bring_home: bool) -> None:
        """Stop everything, in reverse order. With ``bring_home`` the stages' trained weights and optimizer states
        come home first (after DiLoCo reset every replica part to its outer params)."""
        try:
            if bring_home:
                if self.rounds is not None:
                    self.rounds.finish(keep_outer=True)
                if self.pipeline is not None:
                    self.pipeline.bring_home()
        finally:
            stack, self._stack = self._stack, ExitStack()
            self.rounds = None
            stack.close()
            self.client = self.embedded = self.pipeline = None

    def _from_rank0(self, key: str) -> Any:
        """What rank 0 published under ``key``; raises rank 0's own failure if it failed instead."""
        assert self.rendezvous is not None
        timeout = self.config.startup_timeout
        try:
            reply = self.rendezvous.read(key, timeout)
        except TimeoutError:
            raise TimeoutError(f"DistqatStrategy (rank {self.rank}): rank 0 did not publish its {key} within "
                               f"startup_timeout={timeout:.0f}s (see rank 0's log; raise SwarmConfig.startup_timeout "
                               "on a slow machine)") from None
        if "error" in reply:
            raise RuntimeError(f"DistqatStrategy (rank {self.rank}): rank 0 could not start the swarm: "
                               f"{reply['error']}")
        return reply["value"]

    def _tell_ranks_on_failure(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> bool:
        """An ExitStack callback of rank 0: if it unwinds because of ``exc``, the other ranks get it as their answer
        to whatever they still wait for."""
        if exc is not None and self.rendezvous is not None:
            cause = "".join(traceback.format_exception_only(exc)).strip()
            for key in ("peers", "experts"):
                if self.rendezvous.wait([key], 0.001):  # not published yet
                    self.rendezvous.publish(key, {"error": cause})
        return False

    def _rank0_leaves(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> bool:
        self._tell_ranks_on_failure(exc_type, exc, tb)
        self._leave_rendezvous()
        return False

    def _leave_rendezvous(self) -> None:
        assert self.rendezvous is not None
        timeout = self.config.startup_timeout + self.config.request_timeout
        late = self.rendezvous.leave(timeout)
        if late:
            log.warning("DistqatStrategy: ranks %s did not finish within %.0fs; stopping the swarm", late, timeout)
