"""What the strategy mixes into the objects Lightning chose for the Trainer (its precision plugin, its model-summary
callback), keeping every other behaviour of the user's choice."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Union

from torch.optim import Optimizer

if TYPE_CHECKING:
    from lightning_distqat.strategy import DistqatStrategy

__all__ = ["mix_in", "ClipAcrossSwarm"]

_MIXED: dict[tuple[type, type], type] = {}


def mix_in(obj: Any, mixin: type) -> Any:
    """Give ``obj`` the methods of ``mixin`` in front of its own class's (one subclass per pair, made once)."""
    base = type(obj)
    if not issubclass(base, mixin):
        if (base, mixin) not in _MIXED:
            _MIXED[(base, mixin)] = type(f"Distqat{base.__name__}", (mixin, base), {})
        obj.__class__ = _MIXED[(base, mixin)]
    return obj


class ClipAcrossSwarm:
    """Mixed into the Trainer's precision plugin: ``gradient_clip_val`` covers local and remote parameters together
    (the norm over every stage, or clipping by value on every expert)."""

    _distqat_strategy: "DistqatStrategy"

    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: Union[int, float]) -> None:
        self._distqat_strategy.clip_grad_norm(optimizer, float(clip_val))

    def clip_grad_by_value(self, optimizer: Optimizer, clip_val: Union[int, float]) -> None:
        self._distqat_strategy.clip_grad_value(optimizer, float(clip_val))
