"""The outer half of DiLoCo as plain math: outer params, the outer optimizer, pseudo-gradients. No network."""

from __future__ import annotations

import hashlib
from typing import Any, Optional, Sequence

import torch

from lightning_distqat.diloco.config import DiLoCoConfig

__all__ = ["OuterState", "outer_optimizer"]


def outer_optimizer(params: list[torch.nn.Parameter], config: DiLoCoConfig,
                    cls: Optional[type[torch.optim.Optimizer]] = None) -> torch.optim.Optimizer:
    """The outer optimizer of ``config``: Nesterov SGD by default, else ``cls`` (an expert resolves
    ``config.outer_optimizer`` through its allowlist) or ``config.outer_optimizer`` imported by class path (the
    trainer's own config)."""
    if cls is not None:
        return cls(params, **{**config.outer_optimizer_kwargs, "lr": config.outer_lr})
    if config.outer_optimizer is None:
        return torch.optim.SGD(
            params, lr=config.outer_lr, momentum=config.outer_momentum,
            nesterov=config.nesterov and config.outer_momentum > 0,
        )
    from hydra.utils import get_class

    try:
        cls = get_class(config.outer_optimizer)
    except (ImportError, ValueError) as e:
        raise ValueError(f"DiLoCoConfig: outer_optimizer {config.outer_optimizer!r} cannot be imported ({e}); give "
                         "the class path of a torch optimizer, e.g. 'torch.optim.Adam'") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"DiLoCoConfig: outer_optimizer {config.outer_optimizer!r} is not a torch optimizer class")
    return cls(params, **{**config.outer_optimizer_kwargs, "lr": config.outer_lr})


class OuterState:
    """Outer params (CPU) and the outer optimizer for a list of live local params."""

    def __init__(self, local: Sequence[torch.Tensor], config: DiLoCoConfig,
                 optimizer_cls: Optional[type[torch.optim.Optimizer]] = None) -> None:
        self.local = list(local)
        self.outer = [torch.nn.Parameter(p.detach().to("cpu", copy=True)) for p in self.local]
        self.optimizer = outer_optimizer(self.outer, config, optimizer_cls)
        self.round = 0

    def pseudo_gradients(self) -> list[torch.Tensor]:
        """outer - local, on CPU."""
        return [o.detach() - p.detach().cpu() for o, p in zip(self.outer, self.local)]

    @torch.no_grad()
    def apply(self, averaged: Sequence[torch.Tensor]) -> None:
        """One outer step with the averaged pseudo-gradients; local params are reset to the new outer params."""
        for o, g in zip(self.outer, averaged):
            o.grad = g.to(o.dtype).clone()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.copy_to_local()
        self.round += 1

    @torch.no_grad()
    def copy_to_local(self) -> None:
        for p, o in zip(self.local, self.outer):
            p.copy_(o.to(p.device, p.dtype))

    def checksum(self) -> float:
        """A float64 sum over the outer params: replicas that agree have (nearly) equal checksums."""
        return float(sum(o.detach().double().sum() for o in self.outer))

    def digest(self) -> bytes:
        """A 16-byte hash of the round, the outer params and the outer optimizer's tensors: replicas with equal
        digests hold the same outer state bit for bit."""
        h = hashlib.blake2b(str(self.round).encode(), digest_size=16)
        slots = self.optimizer.state_dict()["state"]
        tensors = list(self.outer) + [v for i in sorted(slots) for _, v in sorted(slots[i].items())
                                      if isinstance(v, torch.Tensor)]
        for t in tensors:
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        return h.digest()

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "outer": [o.detach().clone() for o in self.outer],
                "optimizer": self.optimizer.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any], *, reset_local: bool = True) -> None:
        """Adopt an outer state (params, optimizer state, round): another replica's, a snapshot's or a checkpoint's.
        With ``reset_local`` the local params are reset to it (a peer's state); without, they keep what they hold (a
        checkpoint or snapshot restored them, with the inner progress since the round). The hyperparameters of the
        outer optimizer stay this replica's own (its config says what they are)."""
        if len(state["outer"]) != len(self.outer) or any(
            a.shape != b.shape for a, b in zip(state["outer"], self.outer)
        ):
            raise ValueError("DiLoCo: the peer's outer state does not match this replica's parameters")
        own = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, hyper in zip(self.optimizer.param_groups, own):
            group.update(hyper)
        for o, saved in zip(self.outer, state["outer"]):
            o.copy_(saved)
        self.round = int(state["round"])
        if reset_local:
            self.copy_to_local()
