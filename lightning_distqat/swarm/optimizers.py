"""Mapping the user's optimizers onto the experts. Pure logic, no network.

The user's ``configure_optimizers`` sees the whole model. :class:`OptimizerSplit` remembers which of an optimizer's
parameters belong to which stage, keeps only the local ones in the user's optimizer object (so Lightning, LR
schedulers and loggers keep working on it), and describes the rest as one optimizer spec per stage. Checkpoints
always hold the optimizer state in the user's original layout, so they load into plain Lightning too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["OptimizerSplit", "plain_hparams"]


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def plain_hparams(group: dict[str, Any]) -> dict[str, Any]:
    """A param group's hyperparameters (everything but ``params``) as plain, msgpack-able values."""
    return {k: _plain(v) for k, v in group.items() if k not in ("params", "param_names")}


@dataclass
class OptimizerSplit:
    """One user optimizer, split into its local part and one part per stage."""

    optimizer: torch.optim.Optimizer
    index: int
    groups: list[list[nn.Parameter]]
    """Every group's full parameter list, as the user configured it."""
    owner: dict[nn.Parameter, tuple[str, str]] = field(default_factory=dict)
    """Stage parameters: ``param -> (stage, name inside the stage)``."""

    @classmethod
    def create(cls, optimizer: torch.optim.Optimizer, index: int, stages: dict[str, nn.Module]) -> "OptimizerSplit":
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError(
                "DistqatStrategy: LBFGS re-evaluates the closure inside step(), which remote stages cannot replay; "
                "use a first-order optimizer (SGD, Adam, AdamW, ...)"
            )
        owner = {p: (stage, name) for stage, m in stages.items() for name, p in m.named_parameters()}
        groups = [list(g["params"]) for g in optimizer.param_groups]
        return cls(optimizer=optimizer, index=index, groups=groups, owner=owner)

    @property
    def stages(self) -> list[str]:
        """Stages that have parameters in this optimizer, in first-seen order."""
        seen: dict[str, None] = {}
        for group in self.groups:
            for p in group:
                if p in self.owner:
                    seen[self.owner[p][0]] = None
        return list(seen)

    def expert_spec(self, stage: str) -> dict[str, Any]:
        """What the expert of ``stage`` needs to build its part: class path, defaults, groups with param names."""
        cls = type(self.optimizer)
        groups = []
        for group, params in zip(self.optimizer.param_groups, self.groups):
            names = [self.owner[p][1] for p in params if self.owner.get(p, ("",))[0] == stage]
            groups.append({**plain_hparams(group), "param_names": names})
        return {
            "cls": f"{cls.__module__}.{cls.__qualname__}",
            "defaults": plain_hparams(self.optimizer.defaults),
            "groups": groups,
        }

    def group_hparams(self) -> list[dict[str, Any]]:
        """Current hyperparameters of every group (LR schedulers change them between steps)."""
        return [plain_hparams(g) for g in self.optimizer.param_groups]

    def keep_local(self) -> None:
        """Leave only local parameters in the user's optimizer (its state for stage params is empty at this point)."""
        for group, params in zip(self.optimizer.param_groups, self.groups):
            group["params"] = [p for p in params if p not in self.owner]

    def restore(self) -> None:
        """Put every parameter back into the user's optimizer, as configured."""
        for group, params in zip(self.optimizer.param_groups, self.groups):
            group["params"] = list(params)

    # ------------------------------------------------------------------ state in the user's layout
    def merge_state(self, expert_states: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The optimizer state dict as the unsplit user optimizer would produce it.

        ``expert_states[stage]`` is that stage's optimizer state keyed by parameter name (``StageBackend``'s format).
        """
        state: dict[int, Any] = {}
        param_groups = []
        index = 0
        for group, params in zip(self.optimizer.param_groups, self.groups):
            ids = []
            for p in params:
                if p in self.owner:
                    stage, name = self.owner[p]
                    saved = expert_states.get(stage, {}).get("state", {}).get(name)
                else:
                    saved = self.optimizer.state.get(p)
                if saved:
                    state[index] = dict(saved)
                ids.append(index)
                index += 1
            param_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        return {"state": state, "param_groups": param_groups}

    def split_state(self, full: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """Inverse of :meth:`merge_state`: a state dict for the local optimizer and one per stage (by name)."""
        saved_groups = full["param_groups"]
        if len(saved_groups) != len(self.groups) or any(
            len(g["params"]) != len(params) for g, params in zip(saved_groups, self.groups)
        ):
            raise ValueError(
                "DistqatStrategy: the checkpoint's optimizer state does not match the configured optimizer "
                f"({[len(g['params']) for g in saved_groups]} vs {[len(p) for p in self.groups]} params per group)"
            )
        local: dict[str, Any] = {"state": {}, "param_groups": []}
        experts: dict[str, dict[str, Any]] = {
            s: {"state": {}, "param_groups": []} for s in self.stages
        }
        local_index = 0
        for saved, params in zip(saved_groups, self.groups):
            hparams = {k: v for k, v in saved.items() if k not in ("params", "param_names")}
            local_ids = []
            names: dict[str, list[str]] = {s: [] for s in experts}
            for saved_id, p in zip(saved["params"], params):
                entry = full["state"].get(saved_id)
                if p in self.owner:
                    stage, name = self.owner[p]
                    names[stage].append(name)
                    if entry is not None:
                        experts[stage]["state"][name] = entry
                else:
                    if entry is not None:
                        local["state"][local_index] = entry
                    local_ids.append(local_index)
                    local_index += 1
            local["param_groups"].append({**hparams, "params": local_ids})
            for stage in experts:
                experts[stage]["param_groups"].append({**hparams, "param_names": names[stage]})
        return local, experts
