"""A trainer's DiLoCo rounds: its experts' stages and its own parameters, every ``inner_steps`` optimizer steps."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, Mapping, Optional, Sequence

import torch

from lightning_distqat.diloco.config import DiLoCoConfig, group_prefix
from lightning_distqat.diloco.sync import DiLoCoSync
from lightning_distqat.swarm.remote import ExpertError, ExpertHandle

__all__ = ["TrainerRounds"]

log = logging.getLogger(__name__)


class TrainerRounds:
    """Drives the outer rounds of one replica (one pipeline, or one whole model).

    Every expert of the pipeline runs its stage's round (``ExpertHandle.diloco``); the parameters that live on the
    trainer run theirs in group ``trainer-local`` (pipeline mode) or ``model`` (data-parallel mode), concurrently.
    """

    def __init__(
        self,
        config: DiLoCoConfig,
        *,
        handles: Mapping[str, ExpertHandle],
        local_params: Sequence[torch.Tensor],
        dht: Any,
        experiment: str,
        solo: bool,
        request_timeout: float,
    ) -> None:
        """``handles``: the pipeline's experts by stage, a live mapping (an expert replaced mid-run takes part in
        the next round)."""
        self.config = config
        self.handles = handles
        self.solo = solo
        self._pool: Optional[ThreadPoolExecutor] = (
            ThreadPoolExecutor(len(handles), thread_name_prefix="distqat-rounds") if handles else None
        )
        self._timeout = config.averaging_timeout + request_timeout
        self._group = "trainer-local" if handles else "model"
        self._sync = (
            DiLoCoSync(local_params, config, dht=dht, prefix=group_prefix(experiment, self._group), solo=solo)
            if local_params else None
        )
        self.inner_steps = 0
        self.samples_since_round = 0.0
        self.reports: list[dict[str, Any]] = []

    def start(self) -> int:
        """Join every averaging group (loading a peer's outer state where one exists); returns the current round."""
        config = asdict(self.config)
        rounds = [h.diloco("start", timeout=self._timeout, config=config, solo=self.solo)["round"]
                  for h in self.handles.values()]
        if self._sync is not None:
            rounds.append(self._sync.start().state.round)
        return max(rounds, default=0)

    def inner_step_done(self) -> Optional[dict[str, Any]]:
        """Count one inner step (a training batch whose optimizers stepped); run a round when ``inner_steps`` have
        passed. Returns that round's report."""
        self.inner_steps += 1
        if self.inner_steps % self.config.inner_steps:
            return None
        return self._round()

    def _round(self) -> dict[str, Any]:
        samples, self.samples_since_round = self.samples_since_round, 0.0
        pending = []
        if self.handles:  # all stages at once, so the pipeline syncs at one inner step
            assert self._pool is not None
            pending = [self._pool.submit(h.diloco, "round", self._timeout, samples=samples)
                       for h in self.handles.values()]
        per_group: dict[str, dict[str, Any]] = {}
        if self._sync is not None:  # this trainer's own parameters, while the experts run their rounds
            per_group[self._group] = {**asdict(self._sync.round(samples)), "checksum": self._sync.state.checksum()}
        per_group.update({stage: f.result() for stage, f in zip(self.handles, pending)})
        for group, r in per_group.items():
            if r.get("failed"):
                log.warning("DiLoCo round %d of group '%s' went on without averaging (%s)", r["round"], group,
                            r["failed"])
            if r.get("excluded"):
                log.warning("DiLoCo round %d of group '%s' left out %s", r["round"], group, r["excluded"])
        report = {
            "inner_step": self.inner_steps,
            "round": min(r["round"] for r in per_group.values()),
            "group_size": min(r["group_size"] for r in per_group.values()),
            "bytes_sent": sum(r["bytes_sent"] for r in per_group.values()),
            "bytes_received": sum(r["bytes_received"] for r in per_group.values()),
            "checksums": {group: r["checksum"] for group, r in per_group.items()},
        }
        self.reports.append(report)
        return report

    def finish(self, *, keep_outer: bool) -> None:
        """Stop averaging; with ``keep_outer`` every replica part (experts and local) resets to its outer params
        first, so the weights that come home are the outer ones."""
        if keep_outer:
            for handle in self.handles.values():
                try:
                    handle.diloco("finish")
                except ExpertError as e:
                    log.error("DistqatStrategy: stage '%s' could not reset to its outer params: %s", handle.stage, e)
        if self._sync is not None:
            if keep_outer:
                self._sync.state.copy_to_local()
            self._sync.shutdown()
            self._sync = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
