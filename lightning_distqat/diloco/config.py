"""DiLoCo settings, and the names of the averaging groups they run in. Plain values only (Hydra-friendly)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Optional

from lightning_distqat.config import PSEUDO_GRADIENT_CODECS

__all__ = ["DiLoCoConfig", "group_prefix"]


@dataclass(kw_only=True)
class DiLoCoConfig:
    """DiLoCo settings, shared by every replica of an experiment."""

    inner_steps: int = 50
    """H: inner optimizer steps (training batches that stepped) between two outer rounds."""

    outer_lr: float = 0.7
    """Learning rate of the outer optimizer, in (0, 10]."""

    outer_momentum: float = 0.9
    """Momentum of the default outer optimizer (SGD)."""

    nesterov: bool = True
    """Nesterov momentum for the default outer optimizer."""

    outer_optimizer: Optional[str] = None
    """Class path of another outer optimizer (e.g. ``"torch.optim.Adam"``); ``None`` uses SGD with the settings above."""

    outer_optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the outer optimizer (``lr`` is always ``outer_lr``)."""

    averaging_timeout: float = 60.0
    """Seconds a round may take, matchmaking included. Replicas not in the group by then are left out of that round;
    raise it for slow links or large stages."""

    matchmaking_time: float = 3.0
    """Seconds a replica waits for others to join its averaging group before the round starts."""

    target_group_size: Optional[int] = None
    """Largest averaging group (``None``: everyone who shows up)."""

    pseudo_gradient_codec: str = "none"
    """Codec of pseudo-gradients in the all-reduce: ``none``, ``fp16``, ``int8`` or ``int4`` (set from
    ``QuantConfig.pseudo_gradients`` by the strategy). Received parts are accumulated in fp32."""

    codec_block_size: int = 256
    """Values per scale of the ``int8``/``int4`` pseudo-gradient codecs."""

    max_weight_ratio: float = 100.0
    """A replica whose weight (samples since the last round) exceeds this times the median weight of its group is
    left out of the round (a replica cannot claim all the work); in a group of two the heavier weight is capped at
    this times the lighter."""

    max_norm_ratio: float = 4.0
    """A replica whose pseudo-gradient norm exceeds this times the median norm of its group is left out of the round;
    in a group of two the larger pseudo-gradient is scaled down to this times the smaller one's norm."""

    clip_factor: float = 4.0
    """Clipping radius, in median distances of the contributions from their coordinate-wise median: when all are
    within it they average exactly; otherwise the result stays within that radius of the median."""

    max_state_distance: float = 10.0
    """A peer's outer state is adopted only if its distance from this replica's outer params, relative to their norm,
    is at most this (and all of it is finite)."""

    adaptive_batch_size: bool = False
    """Heterogeneous replicas: each replica's samples per inner step are set every round from the paces the group
    announced (``diloco/pace.py``), so that a slower pipeline takes fewer samples per step and every replica reaches
    the next round at about the same time instead of the fast ones waiting; pseudo-gradients stay weighted by
    samples. The batches the loader gives are cut to that size (the rest of each batch is skipped). Off by default:
    which samples train then depends on timing, so runs are not reproducible."""

    batch_size_per_step: Optional[int] = None
    """This replica's samples per inner step, fixed (the first rows of each batch); overrides
    ``adaptive_batch_size``. A per-replica setting: replicas may differ in it."""

    PER_REPLICA: ClassVar[tuple[str, ...]] = ("adaptive_batch_size", "batch_size_per_step")
    """Fields that are this replica's own business (not sent to experts, not compared between replicas)."""

    def shared(self) -> dict[str, Any]:
        """The settings every replica of an experiment must share (what experts compare)."""
        return {k: v for k, v in asdict(self).items() if k not in self.PER_REPLICA}

    def __post_init__(self) -> None:
        if self.batch_size_per_step is not None and (not isinstance(self.batch_size_per_step, int)
                                                     or isinstance(self.batch_size_per_step, bool)
                                                     or self.batch_size_per_step < 1):
            raise ValueError(f"DiLoCoConfig: batch_size_per_step must be None or an int >= 1, got "
                             f"{self.batch_size_per_step!r}")
        if not isinstance(self.adaptive_batch_size, bool):
            raise ValueError(f"DiLoCoConfig: adaptive_batch_size must be a bool, got {self.adaptive_batch_size!r}")
        for name in ("outer_lr", "averaging_timeout", "matchmaking_time", "max_weight_ratio", "max_norm_ratio",
                     "clip_factor", "max_state_distance"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"DiLoCoConfig: {name} must be a finite number > 0, got {value!r}")
        for name, most in (("outer_lr", 10.0), ("averaging_timeout", 3600.0), ("matchmaking_time", 600.0)):
            if getattr(self, name) > most:
                raise ValueError(f"DiLoCoConfig: {name} must be at most {most:g}, got {getattr(self, name)!r}")
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"DiLoCoConfig: nesterov must be a bool, got {self.nesterov!r}")
        if self.target_group_size is not None and (not isinstance(self.target_group_size, int)
                                                   or isinstance(self.target_group_size, bool)
                                                   or not 2 <= self.target_group_size <= 1024):
            raise ValueError(f"DiLoCoConfig: target_group_size must be None or an int in [2, 1024], got "
                             f"{self.target_group_size!r}")
        if self.outer_optimizer is not None and not isinstance(self.outer_optimizer, str):
            raise ValueError(f"DiLoCoConfig: outer_optimizer must be a class path (str) or None, got "
                             f"{self.outer_optimizer!r}")
        if not isinstance(self.outer_optimizer_kwargs, dict) or not all(
                isinstance(k, str) for k in self.outer_optimizer_kwargs):
            raise ValueError(f"DiLoCoConfig: outer_optimizer_kwargs must be a dict with str keys, got "
                             f"{self.outer_optimizer_kwargs!r}")
        if not isinstance(self.outer_momentum, (int, float)) or not 0 <= self.outer_momentum < 1:
            raise ValueError(f"DiLoCoConfig: outer_momentum must be in [0, 1), got {self.outer_momentum!r}")
        if not isinstance(self.codec_block_size, int) or not 2 <= self.codec_block_size <= 2**16:
            raise ValueError(f"DiLoCoConfig: codec_block_size must be an int in [2, 65536], got "
                             f"{self.codec_block_size!r}")
        if not isinstance(self.inner_steps, int) or isinstance(self.inner_steps, bool) or self.inner_steps < 1:
            raise ValueError(f"DiLoCoConfig: inner_steps must be >= 1, got {self.inner_steps}")
        if self.pseudo_gradient_codec not in PSEUDO_GRADIENT_CODECS:
            raise ValueError(f"DiLoCoConfig: pseudo_gradient_codec {self.pseudo_gradient_codec!r} is unknown; "
                             f"expected one of {', '.join(PSEUDO_GRADIENT_CODECS)}")
        if self.averaging_timeout <= self.matchmaking_time:
            raise ValueError(
                f"DiLoCoConfig: averaging_timeout ({self.averaging_timeout}s) must exceed matchmaking_time "
                f"({self.matchmaking_time}s)"
            )


def group_prefix(experiment: str, group: str) -> str:
    """The hivemind averaging group of one stage's DiLoCo replicas (or of a trainer-side group such as
    ``trainer-local``). hivemind forbids dots in group prefixes."""
    return f"{experiment}_{group}_diloco".replace(".", "-")
