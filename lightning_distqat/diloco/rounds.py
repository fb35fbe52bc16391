"""A trainer's DiLoCo rounds: its experts' stages and its own parameters, every ``inner_steps`` optimizer steps."""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from lightning_distqat.diloco.config import DiLoCoConfig, group_prefix
from lightning_distqat.diloco.pace import adapted_batch, step_target
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
        call: Optional[Callable[[str, Callable[[ExpertHandle], Any]], Any]] = None,
    ) -> None:
        """``handles``: the pipeline's experts by stage, a live mapping (an expert replaced mid-run takes part in
        the next round, after :meth:`join`). ``call(stage, fn)``: runs ``fn`` on the stage's expert with failover
        (the pipeline's); None calls ``handles`` directly."""
        self.config = config
        self.handles = handles
        self._call = call or (lambda stage, fn: fn(self.handles[stage]))
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
        self._at: dict[str, int] = {}
        """Each part's outer round (by stage, and this trainer's own group) as last reported."""
        self._ahead: set[str] = set()
        """Parts whose last round took them past its target (a replacement that caught up with a group that was a
        round ahead of this trainer): their next round's target is where they are, so they skip it once."""
        self.reports: list[dict[str, Any]] = []
        self.batch_size: Optional[int] = config.batch_size_per_step
        """Samples per inner step this replica takes from each batch (None: the whole batch): the fixed
        ``batch_size_per_step``, or with ``adaptive_batch_size`` the size set after each round."""
        self.full_batch = 0
        """The largest batch seen (the strategy sets it): the most an adapted batch may take."""
        self._inner_started = self._step_mark = time.monotonic()
        self._step_seconds: list[float] = []
        """Seconds of each inner step since the last round (the pace takes their median: one slow step, a collection
        or a hiccup of the network, does not count)."""
        self._targets: deque[float] = deque(maxlen=3)
        """The fastest replica's step time in the last rounds (adaptive batch sizing aims at the lowest)."""

    def start(self, restore: Optional[Mapping[str, Any]] = None) -> int:
        """Join every averaging group (loading a peer's outer state where one exists; with ``restore``, what
        :meth:`state_dict` returned, e.g. from a checkpoint, first, and a peer's only if it is newer); returns the
        current round."""
        if restore:
            for stage, part in (restore.get("stages") or {}).items():
                if stage in self.handles and part is not None:
                    self._call(stage, lambda h, part=part: h.set_state({"diloco": part}))
            if self._sync is not None and restore.get("local") is not None:
                self._sync.state.load_state_dict(restore["local"], reset_local=False)
            self.inner_steps = int(restore.get("inner_steps", 0))
            self.samples_since_round = float(restore.get("samples_since_round", 0.0))
        self._at, self._ahead = {}, set()
        for stage in self.handles:
            self._note(stage, self._call(stage, self.join).get("round"))
        if self._sync is not None:
            newer_only = bool(restore) and restore.get("local") is not None
            self._note(self._group, self._sync.start(newer_only=newer_only).state.round)
        self._inner_started = self._step_mark = time.monotonic()
        return max(self._at.values(), default=0)

    def _target(self, part: str) -> Optional[int]:
        """The round ``part`` should be at after this round: one past its last, or (once) where it already is."""
        at = self._at.get(part)
        return None if at is None else at if part in self._ahead else at + 1

    def _note(self, part: str, reported: Any, target: Optional[int] = None, skipped: bool = False) -> None:
        """Keep a part's reported round (an expert's word: only an int in [0, 2^31) counts); a round that went past
        ``target`` marks the part ahead."""
        if type(reported) is not int or not 0 <= reported < 2**31:
            log.warning("DistqatStrategy: DiLoCo part '%s' reported the round %r; its next round has no target",
                        part, reported)
            self._at.pop(part, None)
            self._ahead.discard(part)
            return
        self._at[part] = reported
        if target is not None and not skipped and reported > target:
            self._ahead.add(part)
        else:
            self._ahead.discard(part)

    def state_dict(self, *, failover: bool = True) -> dict[str, Any]:
        """The outer state of every part of this replica (each stage's, pulled from its expert, and the trainer's
        own) and the inner-step count: what a checkpoint keeps so that a resumed run continues its outer optimizer.
        Without ``failover`` a dead expert's error is raised instead of waiting for a replacement (teardown)."""
        call = self._call if failover else (lambda stage, fn: fn(self.handles[stage]))
        stages = {stage: call(stage, lambda h: h.get_state(["diloco"])).get("diloco") for stage in self.handles}
        return {"inner_steps": self.inner_steps, "samples_since_round": self.samples_since_round, "stages": stages,
                "local": self._sync.state.state_dict() if self._sync is not None else None}

    def join(self, handle: ExpertHandle, *, listen_first: bool = False) -> dict[str, Any]:
        """Start DiLoCo on an expert: it joins its stage's averaging group and loads the outer state of a live
        replica if there is one. ``listen_first``: it joins mid-round (a replacement), so in its first round it
        takes the others' aggregate instead of adding its own few steps."""
        return handle.diloco("start", timeout=self._timeout, config=self.config.shared(), solo=self.solo,
                             listen_first=listen_first)

    def join_replacement(self, stage: str, handle: ExpertHandle) -> str:
        """The pipeline's ``on_replaced`` hook: a replacement of ``stage`` joins mid-round. Says which outer round
        it is at (a live replica's, if one had a newer state than the snapshot)."""
        joined = self.join(handle, listen_first=True).get("round")
        self._note(stage, joined)
        return f"DiLoCo outer state of round {joined}"

    def inner_step_done(self) -> Optional[dict[str, Any]]:
        """Count one inner step (a training batch whose optimizers stepped); run a round when ``inner_steps`` have
        passed. Returns that round's report."""
        self.inner_steps += 1
        now = time.monotonic()
        self._step_seconds.append(now - self._step_mark)
        self._step_mark = now
        if self.inner_steps % self.config.inner_steps:
            return None
        return self._round()

    def _pace(self, samples: float, seconds: float) -> Optional[dict[str, Any]]:
        """This replica's pace for adaptive batch sizing (None when it does not adapt)."""
        if not self.config.adaptive_batch_size or self.config.batch_size_per_step is not None or not self.full_batch \
                or samples <= 0 or seconds <= 0:
            return None
        return {"sps": float(seconds / samples), "full": int(self.full_batch)}

    def _round(self) -> dict[str, Any]:
        samples, self.samples_since_round = self.samples_since_round, 0.0
        inner_seconds = time.monotonic() - self._inner_started
        steps, self._step_seconds = self._step_seconds, []
        typical = statistics.median(steps) * len(steps) if steps else inner_seconds
        pace = self._pace(samples, typical)
        fields = {"samples": samples, **({"pace": pace} if pace else {})}
        targets = {part: self._target(part) for part in [*self.handles, self._group]}
        pending = []
        if self.handles:  # all stages at once, so the pipeline syncs at one inner step
            assert self._pool is not None
            pending = [self._pool.submit(self._call, stage, lambda h, stage=stage: h.diloco(
                "round", self._timeout, target=targets[stage], **fields)) for stage in self.handles]
        per_group: dict[str, dict[str, Any]] = {}
        if self._sync is not None:  # this trainer's own parameters, while the experts run their rounds
            per_group[self._group] = {**asdict(self._sync.round(samples, pace=pace, target=targets[self._group])),
                                      "checksum": self._sync.state.checksum()}
        per_group.update({stage: f.result() for stage, f in zip(self.handles, pending)})
        for group, r in per_group.items():
            self._note(group, r.get("round"), targets.get(group), bool(r.get("skipped")))
            if r.get("failed"):
                log.warning("DiLoCo round %d of group '%s' went on without averaging (%s)", r["round"], group,
                            r["failed"])
            if r.get("excluded"):
                log.warning("DiLoCo round %d of group '%s' left out %s", r["round"], group, r["excluded"])
        report = {
            "inner_step": self.inner_steps,
            "round": min((r["round"] for r in per_group.values() if type(r.get("round")) is int), default=0),
            "group_size": min((r["group_size"] for r in per_group.values() if not r.get("skipped")), default=0),
            "group_sizes": {group: r["group_size"] for group, r in per_group.items()},
            "bytes_sent": sum(r["bytes_sent"] for r in per_group.values()),
            "bytes_received": sum(r["bytes_received"] for r in per_group.values()),
            "checksums": {group: r["checksum"] for group, r in per_group.items()},
            "inner_seconds": inner_seconds,
            "batch_size": self.batch_size or self.full_batch,
        }
        if pace is not None and self.reports:  # not after the first round of a fit: it includes the warm-up
            # every group holds the same replicas: their paces, whichever group brought them
            paces = [p for r in per_group.values() for p in r.get("paces") or []]
            self._targets.append(step_target(pace, paces))
            self.batch_size = adapted_batch({**pace, "batch": report["batch_size"]}, paces, min(self._targets))
            if self.batch_size != report["batch_size"]:
                log.info("DiLoCo: this replica takes %d of %d samples per inner step from now on (its pace: %.2f ms "
                         "per sample)", self.batch_size, self.full_batch, 1000 * pace["sps"])
        self.reports.append(report)
        self._inner_started = self._step_mark = time.monotonic()
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
