"""How the replicas of a round combine their pseudo-gradients when one of them may be broken or hostile. Pure math.

Every replica receives every other replica's contribution (an all-gather, see ``sync.py``) and computes the aggregate
from the same inputs, in the same order:

0. A contribution of weight 0 is a listener's (a replica that just joined the group mid-round: it has no inner
   progress of its own yet): it takes the aggregate of the others without adding to it.
1. Screening. A contribution is left out if its weight is not finite and positive, or its values are not all finite.
   With three contributions or more, one whose weight is above ``max_weight_ratio`` times the median weight, or whose
   norm is above ``max_norm_ratio`` times the median norm, is left out too. With two there is no majority to ask, and
   both replicas must decide alike (they must end with the same params): the heavier weight is capped at
   ``max_weight_ratio`` times the lighter, and the larger contribution is scaled down to ``max_norm_ratio`` times the
   smaller one's norm, whichever replica computes it.
2. With three or more, the reference is the coordinate-wise median of what is left, and the radius ``tau`` is
   ``clip_factor`` times the median distance of the contributions from it. If every contribution lies within ``tau``
   the result is exactly their weighted mean (honest replicas that agree lose nothing). Otherwise CenteredClip
   (Karimireddy et al., 2021), started at the reference, clips every contribution's pull to ``tau``, and its result is
   projected onto the ball of radius ``tau`` around the reference: whatever weights and directions a minority claims
   within the screening limits, the result stays within ``tau`` of the median, which the majority determines.
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
    listening: list[str]
    """Peers that sent weight 0: they take the aggregate without adding to it."""
    clipped: dict[str, str]
    """Peers whose contribution went in reduced (a pair's larger norm or heavier weight), and how."""


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors]) if tensors else torch.zeros(0, dtype=torch.float64)


def robust_aggregate(contributions: Sequence[Contribution], *, max_weight_ratio: float = 100.0,
                     max_norm_ratio: float = 4.0, clip_factor: float = 4.0, iterations: int = 20,
                     max_weight: float = 1e12) -> Optional[Aggregate]:
    """The screened, clipped aggregate of ``contributions`` (see the module docstring); None if none is left.

    The result is computed in float64 and returned in each tensor's dtype; identical inputs (in any order) give
    identical outputs."""
    contributions = sorted(contributions, key=lambda c: c.peer)
    excluded: dict[str, str] = {}
    clipped: dict[str, str] = {}
    kept: list[Contribution] = []
    listening = [c.peer for c in contributions if isinstance(c.weight, (int, float)) and c.weight == 0]
    for c in contributions:
        if c.peer in listening:
            continue
        if not (isinstance(c.weight, (int, float)) and math.isfinite(c.weight) and 0 < c.weight <= max_weight):
            excluded[c.peer] = f"weight {c.weight!r} is not a finite number in (0, {max_weight:g}]"
        elif not all(bool(torch.isfinite(t).all()) for t in c.tensors):
            excluded[c.peer] = "values that are not finite"
        else:
            kept.append(c)
    flats = {c.peer: _flat(c.tensors) for c in kept}
    norms = {p: float(f.norm()) for p, f in flats.items()}
    weights_of = {c.peer: float(c.weight) for c in kept}
    if len(kept) >= 3:
        median_weight, median_norm = statistics.median(weights_of.values()), statistics.median(norms.values())
        for c in kept:
            if c.weight > max_weight_ratio * median_weight:
                excluded[c.peer] = f"weight above {max_weight_ratio:g} x the median weight"
            elif norms[c.peer] > max_norm_ratio * max(median_norm, 1e-30):
                excluded[c.peer] = f"norm above {max_norm_ratio:g} x the median norm"
        kept = [c for c in kept if c.peer not in excluded]
    elif len(kept) == 2:  # a pair: symmetric caps, so that both replicas compute the same
        light, heavy = sorted(kept, key=lambda c: (c.weight, c.peer))
        if heavy.weight > max_weight_ratio * light.weight:
            weights_of[heavy.peer] = max_weight_ratio * light.weight
            clipped[heavy.peer] = f"weight capped at {max_weight_ratio:g} x the other's"
        small, large = sorted(kept, key=lambda c: (norms[c.peer], c.peer))
        if norms[large.peer] > max_norm_ratio * norms[small.peer]:
            flats[large.peer] = flats[large.peer] * (max_norm_ratio * norms[small.peer] / norms[large.peer])
            clipped[large.peer] = clipped.get(large.peer, "") + \
                ("; " if large.peer in clipped else "") + f"norm scaled down to {max_norm_ratio:g} x the other's"
    if not kept:
        return None
    weights = torch.tensor([weights_of[c.peer] for c in kept], dtype=torch.float64)
    weights = weights / weights.sum()
    points = torch.stack([flats[c.peer] for c in kept])
    center = (weights[:, None] * points).sum(0)
    if len(kept) >= 3:
        reference = points.median(dim=0).values
        distances = (points - reference).norm(dim=1)
        radius = clip_factor * float(distances.median())
        if float(distances.max()) > radius:
            center = reference.clone()
            for _ in range(iterations):
                deltas = points - center
                scale = torch.clamp(radius / torch.clamp(deltas.norm(dim=1), min=1e-300), max=1.0)
                step = (weights[:, None] * deltas * scale[:, None]).sum(0)
                center = center + step
                if float(step.norm()) <= 1e-12 * max(float(center.norm()), 1e-30):
                    break
            offset = center - reference
            if float(offset.norm()) > radius:
                center = reference + offset * (radius / float(offset.norm()))
    out, start = [], 0
    for t in kept[0].tensors:
        n = t.numel()
        out.append(center[start:start + n].view(t.shape).to(t.dtype))
        start += n
    return Aggregate(out, [c.peer for c in kept], excluded, listening, clipped)
