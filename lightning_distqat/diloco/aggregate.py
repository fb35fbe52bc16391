"""How the replicas of a round combine their pseudo-gradients when one of them may be broken or hostile. Pure math.

Every replica receives every other replica's contribution (an all-gather, see ``sync.py``) and computes the same
aggregate from the same inputs, in the same order:

1. Screening. A contribution is left out if its weight is not finite and positive, or above ``max_weight_ratio``
   times the median weight; if any of its values is not finite; or (with three contributions or more) if its norm is
   above ``max_norm_ratio`` times the median norm.
2. CenteredClip (Karimireddy et al., 2021) over what is left, weighted: starting at the weighted mean, every
   contribution's pull on the center is clipped to ``clip_radius``, chosen as ``clip_factor`` times the median distance
   of the contributions to the weighted mean. Contributions that agree (all within that radius) give exactly their
   weighted mean; one that stays far can move the result by at most its weight share of the radius.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["Contribution", "Aggregate", "robust_aggregate"]


@dataclass
class Contribution:
    """One replica's pseudo-gradient (a list of tensors shaped like the stage's parameters) and its weight."""

    peer: str
    weight: float
    tensors: list[torch.Tensor]


@dataclass
class Aggregate:
    tensors: list[torch.Tensor]
    used: list[str]
    """Peers whose contributions went in."""
    excluded: dict[str, str]
    """Peers left out, and why."""


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors]) if tensors else torch.zeros(0, dtype=torch.float64)


def robust_aggregate(contributions: Sequence[Contribution], *, max_weight_ratio: float = 100.0,
                     max_norm_ratio: float = 10.0, clip_factor: float = 4.0, iterations: int = 5,
                     max_weight: float = 1e12) -> Optional[Aggregate]:
    """The screened, CenteredClip aggregate of ``contributions`` (see the module docstring); None if none is left.

    The result is computed in float64 and returned in each tensor's dtype; identical inputs give identical outputs."""
    excluded: dict[str, str] = {}
    kept: list[Contribution] = []
    for c in contributions:
        if not (isinstance(c.weight, (int, float)) and math.isfinite(c.weight) and 0 < c.weight <= max_weight):
            excluded[c.peer] = f"weight {c.weight!r} is not a finite number in (0, {max_weight:g}]"
        elif not all(bool(torch.isfinite(t).all()) for t in c.tensors):
            excluded[c.peer] = "values that are not finite"
        else:
            kept.append(c)
    if len(kept) >= 2:
        median_weight = statistics.median(c.weight for c in kept)
        heavy = {c.peer for c in kept if c.weight > max_weight_ratio * median_weight}
        excluded.update({p: f"weight above {max_weight_ratio:g} x the median weight" for p in heavy})
        kept = [c for c in kept if c.peer not in heavy]
    flats = {c.peer: _flat(c.tensors) for c in kept}
    if len(kept) >= 3:
        norms = {p: float(f.norm()) for p, f in flats.items()}
        median_norm = statistics.median(norms.values())
        large = {p for p, n in norms.items() if n > max_norm_ratio * max(median_norm, 1e-30)}
        excluded.update({p: f"norm above {max_norm_ratio:g} x the median norm" for p in large})
        kept = [c for c in kept if c.peer not in large]
    if not kept:
        return None
    weights = torch.tensor([c.weight for c in kept], dtype=torch.float64)
    weights = weights / weights.sum()
    points = torch.stack([flats[c.peer] for c in kept])
    center = (weights[:, None] * points).sum(0)
    distances = (points - center).norm(dim=1)
    radius = clip_factor * float(distances.median())
    if radius > 0:
        for _ in range(iterations):
            deltas = points - center
            norms = deltas.norm(dim=1)
            scale = torch.clamp(radius / torch.clamp(norms, min=1e-300), max=1.0)
            step = (weights[:, None] * deltas * scale[:, None]).sum(0)
            center = center + step
            if float(step.norm()) <= 1e-12 * max(float(center.norm()), 1e-30):
                break
    out, offset = [], 0
    for t in kept[0].tensors:
        n = t.numel()
        out.append(center[offset:offset + n].view(t.shape).to(t.dtype))
        offset += n
    return Aggregate(out, [c.peer for c in kept], excluded)
