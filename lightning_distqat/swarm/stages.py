"""Stage paths inside a user's module, looked up with clear errors. Pure logic."""

from __future__ import annotations

from typing import Sequence

from torch import nn

__all__ = ["resolve_stages"]


def resolve_stages(module: nn.Module, stages: Sequence[str]) -> dict[str, nn.Module]:
    """Look up every stage path; raise a ValueError that names a bad path and lists the valid ones."""
    available = [name for name, _ in module.named_modules() if name]
    found: dict[str, nn.Module] = {}
    for path in stages:
        if path in found:
            raise ValueError(f"DistqatStrategy: stage '{path}' is listed twice in stages={list(stages)}")
        try:
            found[path] = module.get_submodule(path)
        except AttributeError:
            shown = ", ".join(available[:40]) + (", ..." if len(available) > 40 else "")
            raise ValueError(
                f"DistqatStrategy: stage '{path}' is not a submodule of {type(module).__name__}; "
                f"available: {shown}"
            ) from None
    for a in found:
        for b in found:
            if a != b and b.startswith(a + "."):
                raise ValueError(f"DistqatStrategy: stage '{b}' lies inside stage '{a}'; stages must not overlap")
    stage_params = {p: s for s, m in found.items() for p in m.parameters()}
    for name, p in module.named_parameters(remove_duplicate=False):
        owner = stage_params.get(p)
        if owner is not None and not name.startswith(owner + "."):
            raise ValueError(
                f"DistqatStrategy: parameter '{name}' is shared with stage '{owner}' (tied weights); a stage's "
                "parameters must belong to it alone"
            )
    return found

