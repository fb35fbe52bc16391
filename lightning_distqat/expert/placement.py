"""Which stage an expert serves: the pure decisions behind ``stage=auto`` and behind experts that move to a stage
that lacks experts. No network: the server feeds them the stage directory it read from the DHT.

- At start, :func:`initial_stage` takes the stage with the fewest live experts; among equals, the one that ranks
  this peer first (a hash of peer id and stage), so that servers starting together spread out.
- While serving, :func:`planned_move` finds the neediest stage (no expert, or at least two fewer than the fullest
  one) and the one expert that moves there: among the unleased experts of stages that can spare one (moving leaves
  them at least as many as the target gets), the one whose hash of peer id and target stage is lowest. Every expert
  computes the same answer from the same directory, so exactly one moves per gap. :class:`MovePolicy` adds the
  hysteresis: a gap must last ``patience`` checks, and an expert that moved stays ``min_stay`` seconds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

from lightning_distqat.swarm.records import ExpertRecord

__all__ = ["initial_stage", "planned_move", "stage_counts", "MovePolicy"]


def _rank(peer_id: str, stage: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{peer_id}|{stage}".encode()).digest()[:8], "big")


def stage_counts(stages: Sequence[str], directory: Sequence[ExpertRecord]) -> dict[str, int]:
    """Live experts per stage of ``stages`` (records of other stages are not counted)."""
    counts = {stage: 0 for stage in stages}
    for record in directory:
        if record.stage in counts:
            counts[record.stage] += 1
    return counts


def initial_stage(stages: Sequence[str], directory: Sequence[ExpertRecord], peer_id: str) -> str:
    """The stage a new expert takes: the fewest live experts, ties broken by the peer's own ranking."""
    if not stages:
        raise ValueError("stage=auto needs the model's stage list (ExpertConfig.stages or the model's STAGES)")
    counts = stage_counts(stages, [r for r in directory if r.peer_id != peer_id])
    fewest = min(counts.values())
    return min((s for s in stages if counts[s] == fewest), key=lambda s: _rank(peer_id, s))


def planned_move(stages: Sequence[str], directory: Sequence[ExpertRecord], peer_id: str) -> Optional[str]:
    """The stage that ``peer_id`` (in ``directory``) should move to now, or None. See the module docstring."""
    counts = stage_counts(stages, directory)
    if not counts:
        return None
    target = min(stages, key=lambda s: (counts[s], s))
    movers = [r for r in directory
              if r.stage in counts and r.stage != target and not r.leased and counts[r.stage] - counts[target] >= 2]
    if not movers:
        return None
    chosen = min(movers, key=lambda r: (_rank(r.peer_id, target), r.peer_id))
    return target if chosen.peer_id == peer_id else None


@dataclass
class MovePolicy:
    """Hysteresis over :func:`planned_move`: :meth:`check` returns a stage only after the same plan held for
    ``patience`` consecutive checks, and never within ``min_stay`` seconds of the last move."""

    patience: int = 3
    min_stay: float = 60.0
    _plan: Optional[str] = field(default=None, repr=False)
    _seen: int = field(default=0, repr=False)
    _stay_until: float = field(default=0.0, repr=False)

    def check(self, plan: Optional[str], now: float) -> Optional[str]:
        if plan is None or plan != self._plan:
            self._plan, self._seen = plan, 1 if plan is not None else 0
        else:
            self._seen += 1
        if plan is None or self._seen < self.patience or now < self._stay_until:
            return None
        return plan

    def moved(self, now: float) -> None:
        self._plan, self._seen, self._stay_until = None, 0, now + self.min_stay
