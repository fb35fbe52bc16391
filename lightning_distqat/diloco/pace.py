"""Adaptive batch sizing of DiLoCo replicas (pure): each replica's batch per inner step is chosen from the paces the
replicas announced in the last outer round, so that all of them reach the next round at about the same time.

A pace is ``{"sps": seconds per sample over the last round's inner steps, "full": the replica's whole batch}``. The
fastest replica's time per inner step at its whole batch is the target ``tau = min(sps_j * full_j)``; every replica
then takes ``b = tau / sps`` samples per step (at most its whole batch, at least 1). Its seconds per sample are
measured at its current batch, so a fixed cost per step is counted in: with a step time of ``c + a * b`` the next
batch is ``tau * b / (c + a * b)``, which converges to ``c + a * b = tau`` (the step time of the fastest) within a few
rounds without overshooting.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

__all__ = ["parse_pace", "step_target", "adapted_batch", "DAMPING"]

DAMPING = 0.75
"""How far (geometrically) a replica moves from its current batch toward the target each round."""


def parse_pace(value: Any) -> Optional[dict[str, Any]]:
    """``value`` as a pace, or None if it is not one (whatever a peer sent)."""
    if not isinstance(value, dict) or set(value) != {"sps", "full"}:
        return None
    sps, full = value["sps"], value["full"]
    if not isinstance(sps, float) or not math.isfinite(sps) or not 0 < sps < 1e6:
        return None
    if not isinstance(full, int) or isinstance(full, bool) or not 1 <= full <= 2**31:
        return None
    return {"sps": sps, "full": full}


def step_target(own: dict[str, Any], paces: Iterable[Any]) -> float:
    """``tau``: the fastest replica's seconds per inner step at its whole batch, from the group's paces (its own
    among them; malformed ones are ignored)."""
    valid = [p for p in map(parse_pace, paces) if p is not None] + [own]
    return min(p["sps"] * p["full"] for p in valid)


def adapted_batch(own: dict[str, Any], paces: Iterable[Any], tau: Optional[float] = None) -> int:
    """The batch per inner step for a replica with pace ``own``, given the paces of its group (its own among them;
    malformed ones are ignored). With ``own["batch"]`` (the batch the pace was measured at) the step is damped:
    ``target**DAMPING * batch**(1 - DAMPING)``. ``tau``: the step time to reach, if not the group's current one (a
    replica keeps the lowest of the last few rounds', so that one slow round of the fastest does not swing it back)."""
    now = step_target(own, paces)
    if own["sps"] * own["full"] <= now:  # the fastest replica now: it takes its whole batch
        return own["full"]
    target = min(now, tau if tau is not None else now) / own["sps"]
    if "batch" in own and own["batch"] > 0:  # most of the way (geometrically) from the current batch: one noisy
        target = target**DAMPING * own["batch"] ** (1 - DAMPING)  # round must not swing it
    return max(1, min(own["full"], round(target)))
