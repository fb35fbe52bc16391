"""The pipeline a trainer holds: one expert per stage, and everything that maps the user's module and optimizers onto
those experts (the original submodules, the optimizer split, state pull and push, the checkpoint layout, remote grad
norms, wire bytes). The strategy calls it from Lightning's hooks; nothing here imports Lightning.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, TypeVar

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_distqat.config import QuantConfig
from lightning_distqat.swarm.optimizers import OptimizerSplit
from lightning_distqat.swarm.remote import ExpertError, ExpertHandle, RemoteStage

__all__ = ["RemotePipeline", "human_count"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def human_count(n: int) -> str:
    """``11.2 M``, ``2.1 K``, ``640``: how Lightning's summary writes parameter counts."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


class RemotePipeline:
    """One expert per stage for a trainer: ``handles[stage]`` serves ``originals[stage]``.

    ``handles`` is a live mapping: :meth:`replace` swaps the expert of one stage while training goes on, and the
    proxies (``RemoteStage``) look their expert up at every call.
    """

    def __init__(self, originals: Mapping[str, nn.Module], handles: Mapping[str, ExpertHandle], *,
                 quant: Optional[QuantConfig] = None) -> None:
        self.originals = dict(originals)
        self.handles: dict[str, ExpertHandle] = {}
        self.quant = quant or QuantConfig(enabled=False)
        self.splits: dict[int, OptimizerSplit] = {}
        """The user's optimizers, split into their local part and one part per stage (by ``id(optimizer)``)."""
        self._retired = {"bytes_sent": 0, "bytes_received": 0}
        self._pool = ThreadPoolExecutor(max(1, len(originals)), thread_name_prefix="distqat-fanout")
        for stage, handle in handles.items():
            self._adopt(stage, handle)

    @property
    def stages(self) -> list[str]:
        return list(self.originals)

    def _adopt(self, stage: str, handle: ExpertHandle) -> None:
        settings = self.quant.for_stage(stage)
        handle.activations = settings.wire_codec("activations")
        handle.gradients = settings.wire_codec("gradients")
        self.handles[stage] = handle

    def replace(self, stage: str, handle: ExpertHandle) -> ExpertHandle:
        """Make ``handle`` the expert of ``stage`` from the next call on; returns the one it replaces. The caller
        brings the new expert to the stage's state (configure, set_state)."""
        old = self.handles[stage]
        self._retired["bytes_sent"] += old.bytes_sent
        self._retired["bytes_received"] += old.bytes_received
        self._adopt(stage, handle)
        return old

    def close(self) -> None:
        """Stop the threads that fan calls out to the experts (the experts themselves belong to others)."""
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------ the user's module
    def install(self, module: nn.Module) -> None:
        """Put a ``RemoteStage`` in place of every stage submodule of ``module``."""
        for stage in self.originals:
            module.set_submodule(stage, RemoteStage(stage, self.handles))

    def uninstall(self, module: nn.Module) -> None:
        """Put the original submodules back."""
        for stage, original in self.originals.items():
            module.set_submodule(stage, original)

    @contextmanager
    def originals_in_place(self, module: nn.Module) -> Iterator[None]:
        """The original submodules in place for a while (``configure_optimizers`` must see every parameter)."""
        proxies = {stage: module.get_submodule(stage) for stage in self.originals}
        self.uninstall(module)
        try:
            yield
        finally:
            for stage, proxy in proxies.items():
                module.set_submodule(stage, proxy)

    def param_counts(self, trainable: bool = False) -> dict[str, int]:
        """Parameters of every stage (those of its expert, which has the same shapes)."""
        return {stage: sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)
                for stage, m in self.originals.items()}

    def describe(self) -> str:
        """``stem (2.1 K params) @ …abcd1234 -> ...``: one line for the start-up log."""
        counts = self.param_counts()
        return " -> ".join(f"{s} ({human_count(counts[s])} params) @ …{h.peer_id[-8:]}" for s, h in self.handles.items())

    # ------------------------------------------------------------------ calls on every expert
    def each(self, fn: Callable[[ExpertHandle], T], stages: Optional[Sequence[str]] = None) -> list[T]:
        """``fn`` on the expert of every stage (or of ``stages``) concurrently; re-raises the first error."""
        handles = [self.handles[s] for s in (self.stages if stages is None else stages)]
        if len(handles) <= 1:
            return [fn(h) for h in handles]
        return list(self._pool.map(fn, handles))

    def wire_bytes(self) -> dict[str, int]:
        """Tensor bytes sent to and received from the experts by forward/backward calls (after encoding)."""
        return {k: v + sum(getattr(h, k) for h in self.handles.values()) for k, v in self._retired.items()}

    # ------------------------------------------------------------------ optimizers
    def configure(self, optimizers: Sequence[Optimizer]) -> None:
        """Split the user's optimizers: their local parameters stay in them, each stage's part is created on its
        expert (after torchao QAT is prepared there, where the stage's QuantConfig asks for it)."""
        self.splits = {}
        specs: dict[str, dict[int, dict[str, Any]]] = {stage: {} for stage in self.stages}
        for index, optimizer in enumerate(optimizers):
            split = OptimizerSplit.create(optimizer, index, self.originals)
            split.keep_local()
            self.splits[id(optimizer)] = split
            for stage in split.stages:
                specs[stage][index] = split.expert_spec(stage)
        self.each(lambda h: h.configure(specs[h.stage], qat=self._qat(h.stage)))

    def _qat(self, stage: str) -> Optional[dict[str, Any]]:
        settings = self.quant.for_stage(stage)
        return {"scheme": settings.qat, "group_size": settings.qat_group_size} if settings.qat else None

    def split_of(self, optimizer: Optimizer) -> Optional[OptimizerSplit]:
        """The split of the user's ``optimizer`` (or of the LightningOptimizer around it); None if it has none."""
        return self.splits.get(id(getattr(optimizer, "_optimizer", optimizer)))

    def step(self, optimizer: Optimizer, *, clip_norm: Optional[tuple[float, float]] = None,
             clip_value: Optional[float] = None) -> None:
        """The inner step of ``optimizer``'s part on every expert that has one, with the current hyperparameters
        of every param group (LR schedulers change them)."""
        split = self.split_of(optimizer)
        if split is not None:
            groups = split.group_hparams()
            self.each(lambda h: h.step(split.index, groups, clip_norm=clip_norm, clip_value=clip_value), split.stages)

    def grad_norms(self, optimizer: Optimizer, norm_type: float) -> list[float]:
        """The gradient norm of ``optimizer``'s part on each expert."""
        split = self.split_of(optimizer)
        return self.each(lambda h: h.grad_norm(norm_type), split.stages) if split is not None else []

    def restore_optimizers(self) -> None:
        """Every parameter back in the user's optimizers, as configured."""
        for split in self.splits.values():
            split.restore()

    # ------------------------------------------------------------------ state
    def pull(self, stages: Optional[Sequence[str]] = None) -> dict[str, dict[str, Any]]:
        """Module state and optimizer states of every stage's expert."""
        names = self.stages if stages is None else list(stages)
        return dict(zip(names, self.each(lambda h: h.get_state(), names)))

    def seed(self) -> None:
        """Send the original submodules' weights to the experts (a joined swarm's experts have weights of their own)."""
        self.each(lambda h: h.set_state({"module": self.originals[h.stage].state_dict()}))

    def module_state_dict(self) -> dict[str, torch.Tensor]:
        """Every stage's weights, keyed as in the user's module (``stage.param``)."""
        return {f"{stage}.{k}": v for stage, state in self.pull().items() for k, v in state["module"].items()}

    def split_module_state(self, full: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """A state dict of the whole module -> (its local part, one part per stage with keys inside the stage)."""
        local: dict[str, Any] = {}
        parts: dict[str, dict[str, Any]] = {stage: {} for stage in self.stages}
        for key, value in full.items():
            stage = next((s for s in parts if key.startswith(s + ".")), None)
            if stage is None:
                local[key] = value
            else:
                parts[stage][key[len(stage) + 1:]] = value
        return local, parts

    def load_module_state(self, full: Mapping[str, Any], module: nn.Module, strict: bool = True) -> None:
        """Load a whole-module state dict: the local part into ``module``, each stage's part into its expert."""
        local, parts = self.split_module_state(full)
        module.load_state_dict(local, strict=strict)
        self.each(lambda h: h.set_state({"module": parts[h.stage]}))

    def optimizer_state(self, optimizer: Optimizer, states: Optional[Mapping[str, dict[str, Any]]] = None
                        ) -> dict[str, Any]:
        """``optimizer``'s state dict as the unsplit user optimizer would give it (``states``: pulled already)."""
        split = self.split_of(optimizer)
        assert split is not None, "not an optimizer of this pipeline"
        states = self.pull(split.stages) if states is None else states
        return split.merge_state({s: st["optimizers"].get(split.index, {}) for s, st in states.items()})

    def load_optimizer_states(self, optimizers: Sequence[Optimizer], saved: Sequence[Mapping[str, Any]]) -> None:
        """Load the user-layout optimizer states of a checkpoint: local parts here, stage parts on the experts."""
        parts: dict[str, dict[int, Any]] = {stage: {} for stage in self.stages}
        for optimizer, state in zip(optimizers, saved):
            split = self.split_of(optimizer)
            assert split is not None, "not an optimizer of this pipeline"
            local, per_stage = split.split_state(state)
            optimizer.load_state_dict(local)
            for stage, part in per_stage.items():
                parts[stage][split.index] = part
        self.each(lambda h: h.set_state({"optimizers": parts[h.stage]}))

    def bring_home(self) -> None:
        """Load every stage's trained weights and optimizer state from its expert into the user's objects, and put
        every parameter back into the user's optimizers.

        A stage whose expert cannot answer keeps the weights it had when training started; the error says which.
        """

        def pull(handle: ExpertHandle) -> Any:
            try:
                return handle.get_state()
            except ExpertError as e:
                return e

        pulled = dict(zip(self.stages, self.each(pull)))
        states = {}
        for stage, state in pulled.items():
            if isinstance(state, ExpertError):
                log.error("DistqatStrategy: could not bring the trained weights of stage '%s' home (%s); the module "
                          "keeps the weights this stage had when training started", stage, state)
            else:
                states[stage] = state
        for stage, state in states.items():
            original = self.originals[stage]
            device = next(original.parameters(), torch.empty(0)).device
            original.load_state_dict({k: v.to(device) for k, v in state["module"].items()})
        for split in self.splits.values():
            merged = self.optimizer_state(split.optimizer, states)
            split.restore()
            split.optimizer.load_state_dict(merged)
