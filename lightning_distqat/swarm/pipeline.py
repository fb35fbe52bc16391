"""The pipeline a trainer holds: one expert per stage, and everything that maps the user's module and optimizers onto
those experts (the original submodules, the optimizer split, state pull and push, the checkpoint layout, remote grad
norms, wire bytes). The strategy calls it from Lightning's hooks; nothing here imports Lightning.

Failover: every call to an expert goes through :meth:`RemotePipeline.call`. When the expert of a stage dies, stops
answering or leaves, :meth:`RemotePipeline.recover` claims another one of that stage (through ``replacer``), brings it
to the stage's state (the leaving expert's own state, else the newest snapshot, taken every ``mirror_every`` steps
off the training thread), replays the calls of the step in flight from the journal (forwards with their inputs,
backwards with their output gradients, under the same request ids) and retries the call that failed. With a
snapshot of the last step, the new expert ends the step exactly where the dead one would have.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, TypeVar

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_distqat.config import QuantConfig
from lightning_distqat.swarm.optimizers import OptimizerSplit
from lightning_distqat.swarm.overlap import waiting
from lightning_distqat.swarm.remote import (ExpertError, ExpertHandle, ExpertLeavingError, ExpertUnavailableError,
                                            RemoteStage)

__all__ = ["RemotePipeline", "human_count"]

log = logging.getLogger(__name__)
T = TypeVar("T")

Replacer = Callable[[str, ExpertHandle, str], ExpertHandle]
"""``replacer(stage, gone, cause)``: claim another expert of ``stage`` in place of ``gone`` (or raise)."""

MAX_FAILOVERS_PER_CALL = 3
"""Experts one call may go through (each dying in turn) before its error reaches the user."""


@dataclass(eq=False)
class _Call:
    """A forward of the step in flight, kept so that a replacement expert can replay it."""

    request_id: str
    layout: dict[str, Any]
    inputs: list[torch.Tensor]
    training: bool
    batch: int
    """The optimizer steps taken before it (its step is the next one)."""
    grads: Optional[list[torch.Tensor]] = None
    """The output gradients of its backward, once that ran."""


@dataclass(eq=False)
class _Step:
    """An optimizer step sent to a stage's expert and not yet confirmed (the trainer goes on meanwhile)."""

    index: int
    groups: list[dict[str, Any]]
    clip_norm: Optional[tuple[float, float]]
    clip_value: Optional[float]
    batch: int
    handle: ExpertHandle
    future: Future


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
                 quant: Optional[QuantConfig] = None, replacer: Optional[Replacer] = None,
                 mirror_every: int = 0) -> None:
        """``replacer``: how to claim a replacement for an expert that is gone (``None``: no failover, the error
        reaches the user). ``mirror_every``: snapshot every stage's state every that many optimizer steps (0: only
        at the start of training)."""
        self.originals = dict(originals)
        self.handles: dict[str, ExpertHandle] = {}
        self.quant = quant or QuantConfig(enabled=False)
        self.splits: dict[int, OptimizerSplit] = {}
        """The user's optimizers, split into their local part and one part per stage (by ``id(optimizer)``)."""
        self.replacer = replacer
        self.mirror_every = mirror_every
        self.norm_type: Optional[float] = None
        """The norm type the trainer clips gradients by (None: it does not): backward answers bring it along."""
        self.on_replaced: list[Callable[[str, ExpertHandle], Optional[str]]] = []
        """Called with (stage, new handle) after a replacement got the stage's state, before the journal replays
        (DiLoCo joins the stage's averaging group there); may return a note for the log."""
        self.failovers: list[dict[str, Any]] = []
        """One entry per replaced expert: stage, old and new peer id, cause, state source, seconds it took."""
        self._specs: dict[str, dict[int, dict[str, Any]]] = {}
        self._journal: dict[str, list[Any]] = {stage: [] for stage in originals}
        """Per stage, what its expert did since its last confirmed state: forwards (``_Call``) and steps (``_Step``),
        in order; a replacement replays them."""
        self._in_flight: dict[str, list[_Step]] = {stage: [] for stage in originals}
        """Steps sent to each stage's expert whose answer was not read yet (see :meth:`settle`)."""
        self._snapshots: dict[str, tuple[int, dict[str, Any]]] = {}
        self._snapshot_futures: list[Future] = []
        self._steps = 0
        self._recovering = threading.Lock()
        self._retired = {"bytes_sent": 0, "bytes_received": 0}
        self._pool = ThreadPoolExecutor(max(1, len(originals)), thread_name_prefix="distqat-fanout")
        self._mirror = ThreadPoolExecutor(max(1, len(originals)), thread_name_prefix="distqat-snapshot")
        for stage, handle in handles.items():
            self._adopt(stage, handle)

    @property
    def stages(self) -> list[str]:
        return list(self.originals)

    def _adopt(self, stage: str, handle: ExpertHandle) -> None:
        settings = self.quant.for_stage(stage)
        handle.norm_type = self.norm_type
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
        self._mirror.shutdown(wait=True)
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------ failover
    def call(self, stage: str, fn: Callable[[ExpertHandle], T]) -> T:
        """``fn`` on the expert of ``stage``; if that expert is gone, on its replacement (see :meth:`recover`). The
        steps sent to that stage land first (:meth:`settle`)."""
        self.settle(stage)
        for attempt in range(MAX_FAILOVERS_PER_CALL + 1):
            handle = self.handles[stage]
            try:
                return fn(handle)
            except ExpertUnavailableError as e:
                if self.replacer is None or attempt == MAX_FAILOVERS_PER_CALL:
                    raise
                self.recover(stage, handle, e)
        raise AssertionError("unreachable")

    def recover(self, stage: str, gone: ExpertHandle, error: ExpertError) -> ExpertHandle:
        """Replace ``gone``, the expert of ``stage``: claim another, configure its optimizers (and QAT) as the
        trainer did, load the stage's state (from ``gone`` itself if it is leaving, else the newest snapshot, else
        the weights the stage had when training started), let ``on_replaced`` hooks run, replay the step in flight
        (the journal), and make it the stage's expert. Concurrent failures of one stage replace it once."""
        assert self.replacer is not None
        with waiting():  # a micro-batch's thread gives up its baton while it waits for another's recovery
            self._recovering.acquire()
        try:
            return self._recover(stage, gone, error)
        finally:
            self._recovering.release()

    def _recover(self, stage: str, gone: ExpertHandle, error: ExpertError) -> ExpertHandle:
        assert self.replacer is not None
        if self.handles[stage] is not gone:
            return self.handles[stage]  # another thread replaced it meanwhile
        started = time.monotonic()
        leaving = isinstance(error, ExpertLeavingError)
        cause = "is leaving" if leaving else "is gone"
        state, source, lost = None, "", 0
        if leaving:
            try:
                state, source = gone.get_state(), "the leaving expert's own state"
            except ExpertError as e:
                log.warning("stage '%s': the leaving expert could not hand its state over (%s)", stage, e)
        # the leaving expert's state holds the steps replayed into it when it took over (journal steps sent to an
        # earlier expert) and lacks the rest
        since = 1 + max((e.batch for e in self._journal[stage] if isinstance(e, _Step) and e.handle is not gone),
                        default=-1)
        if state is None:
            state, source, lost, since = self._stage_snapshot(stage)
        for _ in range(MAX_FAILOVERS_PER_CALL):
            new = self.replacer(stage, gone, cause)
            try:
                new.configure(self._specs.get(stage, {}), qat=self._qat(stage))
                new.set_state(state)
                notes = [note for hook in self.on_replaced if (note := hook(stage, new))]
                self._replay(stage, new, since)
                break
            except ExpertUnavailableError as e:  # the replacement died too: the next one
                gone, cause = new, f"died while taking over ({e})"
        else:
            raise ExpertUnavailableError(f"stage '{stage}': {MAX_FAILOVERS_PER_CALL} replacements in a row "
                                         "died while taking over") from error
        source = "; ".join([source, *notes])
        old = self.handles[stage]
        self.replace(stage, new)
        took = time.monotonic() - started
        self.failovers.append({"stage": stage, "old": old.peer_id, "new": new.peer_id, "cause": cause,
                               "source": source, "steps_lost": lost, "seconds": took, "step": self._steps,
                               "done_at": time.time()})
        log.warning("stage '%s': expert …%s took over from …%s in %.1f s, from %s; the step in flight was "
                    "replayed (%d calls)", stage, new.peer_id[-8:], old.peer_id[-8:], took, source,
                    len(self._journal[stage]))
        return new

    def _stage_snapshot(self, stage: str) -> tuple[dict[str, Any], str, int, int]:
        """The newest snapshot of ``stage`` (waiting for one in flight), or the stage's weights at the start; with
        where it comes from, the optimizer steps of this stage it lacks and the steps it holds."""
        self.wait_for_snapshot()
        journal = self._journal[stage]
        base = journal[0].batch if journal else self._steps  # the steps the journal builds on
        if stage in self._snapshots:
            step, state = self._snapshots[stage]
            lost = max(0, base - step)
            lacks = f" ({lost} step{'s' if lost != 1 else ''} of this stage lost)" if lost else ""
            return state, f"the snapshot of step {step}{lacks}", lost, step
        return ({"module": self.originals[stage].state_dict()}, "the weights at the start of training (no snapshot)",
                base, 0)

    def _replay(self, stage: str, handle: ExpertHandle, since: int = 0) -> None:
        """Replay the journal's forwards, backwards and steps of batches from ``since`` on (what the state that
        ``handle`` got lacks)."""
        for entry in self._journal[stage]:
            if entry.batch < since:
                continue
            if isinstance(entry, _Step):
                handle.step(entry.index, entry.groups, clip_norm=entry.clip_norm, clip_value=entry.clip_value)
                continue
            handle.forward(entry.request_id, entry.layout, entry.inputs, training=entry.training, need_grad=True)
            if entry.grads is not None:
                handle.backward(entry.request_id, entry.grads)

    def settle(self, stage: Optional[str] = None) -> None:
        """Wait for the steps sent to ``stage``'s expert (every stage's if None) and read their answers: a step
        that landed drops what it consumed from the journal; a step whose expert died replaces that expert (the
        replacement replays it); a step the expert refused raises its error."""
        for name in self.stages if stage is None else [stage]:
            steps = self._in_flight[name]
            while steps:
                entry = steps[0]
                try:
                    entry.handle.step_result(entry.future)
                except ExpertUnavailableError as e:
                    steps.clear()  # the journal holds them: the replacement replays every one
                    if self.replacer is None:
                        raise
                    if self.handles[name] is entry.handle:
                        self.recover(name, entry.handle, e)
                    break
                except ExpertError:
                    self._confirmed(name, entry)
                    raise
                self._confirmed(name, entry)

    def _confirmed(self, stage: str, step: _Step) -> None:
        """``step`` landed (or was refused): neither it nor what came before it is replayed. Another micro-batch's
        thread may have read it first (they wait for the same step)."""
        steps = self._in_flight[stage]
        if steps and steps[0] is step:
            steps.pop(0)
        journal = self._journal[stage]
        for i, entry in enumerate(journal):
            if entry is step:
                del journal[:i + 1]
                return

    def snapshot(self, *, wait: bool = False) -> None:
        """Pull every stage's state (module and optimizers) off the training thread, as of the last optimizer step;
        the next step waits until it landed (see :meth:`wait_for_snapshot`). A stage whose expert cannot answer keeps
        its previous snapshot."""
        self.wait_for_snapshot()
        self.settle()  # the snapshot holds every step taken so far
        step = self._steps

        def pull(stage: str) -> None:
            try:
                self._snapshots[stage] = (step, self.handles[stage].get_state())
            except ExpertError as e:
                log.warning("stage '%s': no snapshot at step %d (%s)", stage, step, e)

        self._snapshot_futures = [self._mirror.submit(pull, stage) for stage in self.stages]
        if wait:
            self.wait_for_snapshot()

    def wait_for_snapshot(self) -> None:
        """Return once the snapshot in flight (if any) has landed."""
        for future in list(self._snapshot_futures):
            future.result()

    def step_done(self) -> None:
        """A training batch whose optimizers stepped ended: the journal of a stage starts afresh, unless a step of
        it is still in flight (then it goes once that step landed, see :meth:`settle`)."""
        self._steps += 1
        for stage, journal in self._journal.items():
            if not self._in_flight[stage]:
                journal.clear()

    def snapshot_if_due(self) -> None:
        """A snapshot every ``mirror_every`` steps (after the step's DiLoCo round, if one ran)."""
        if self.mirror_every and self._steps % self.mirror_every == 0:
            self.snapshot()

    # ------------------------------------------------------------------ the Route of RemoteStage
    def forward(self, stage: str, request_id: str, layout: dict[str, Any], tensors: Sequence[torch.Tensor], *,
                training: bool, need_grad: bool) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """Run ``stage`` on its expert; with ``need_grad`` the call is journaled until the step ends."""
        result = self.call(stage, lambda h: h.forward(request_id, layout, tensors, training=training,
                                                     need_grad=need_grad))
        if need_grad and self.replacer is not None:
            self._journal[stage].append(_Call(request_id, layout, list(tensors), training, self._steps))
        return result

    def backward(self, stage: str, request_id: str, grad_outputs: Sequence[torch.Tensor]
                 ) -> list[Optional[torch.Tensor]]:
        result = self.call(stage, lambda h: h.backward(request_id, grad_outputs))
        for call in reversed(self._journal[stage]):
            if isinstance(call, _Call) and call.request_id == request_id:
                call.grads = list(grad_outputs)
                break
        return result

    def describe_stage(self, stage: str) -> str:
        return f"expert=…{self.handles[stage].peer_id[-8:]}"

    # ------------------------------------------------------------------ the user's module
    def install(self, module: nn.Module) -> None:
        """Put a ``RemoteStage`` in place of every stage submodule of ``module``."""
        for stage in self.originals:
            module.set_submodule(stage, RemoteStage(stage, self))

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
        """``fn`` on the expert of every stage (or of ``stages``) concurrently, each with failover; re-raises the
        first error."""
        names = list(self.stages if stages is None else stages)
        if len(names) <= 1:
            return [self.call(s, fn) for s in names]
        return list(self._pool.map(lambda s: self.call(s, fn), names))

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
        self._specs = specs
        self.each(lambda h: h.configure(specs[h.stage], qat=self._qat(h.stage)))

    def _qat(self, stage: str) -> Optional[dict[str, Any]]:
        """The QAT of ``stage``. A model-wide ``qat`` skips stages without ``nn.Linear`` layers (embeddings): there
        is nothing to quantize there; a stage's own ``stages={...: {"qat": ...}}`` is sent as it is (the expert
        refuses it for such a stage, naming it)."""
        settings = self.quant.for_stage(stage)
        if not settings.qat:
            return None
        explicit = "qat" in self.quant.stages.get(stage, {})
        if not explicit and not any(isinstance(m, torch.nn.Linear) for m in self.originals[stage].modules()):
            log.info("stage '%s' has no nn.Linear layer: QAT (%s) leaves it as it is", stage, settings.qat)
            return None
        return {"scheme": settings.qat, "group_size": settings.qat_group_size}

    def split_of(self, optimizer: Optimizer) -> Optional[OptimizerSplit]:
        """The split of the user's ``optimizer`` (or of the LightningOptimizer around it); None if it has none."""
        return self.splits.get(id(getattr(optimizer, "_optimizer", optimizer)))

    def step(self, optimizer: Optimizer, *, clip_norm: Optional[tuple[float, float]] = None,
             clip_value: Optional[float] = None) -> None:
        """The inner step of ``optimizer``'s part on every expert that has one, with the current hyperparameters
        of every param group (LR schedulers change them)."""
        split = self.split_of(optimizer)
        if split is None:
            return
        self.wait_for_snapshot()  # a snapshot must not see this step
        groups = split.group_hparams()
        for stage in split.stages:  # sent, not waited for: the next call to each stage waits (settle)
            self.settle(stage)
            handle = self.handles[stage]
            future = handle.send_step(split.index, groups, clip_norm=clip_norm, clip_value=clip_value)
            entry = _Step(split.index, groups, clip_norm, clip_value, self._steps, handle, future)
            self._in_flight[stage].append(entry)
            if self.replacer is not None:
                self._journal[stage].append(entry)

    def clip_by_norm(self, norm_type: Optional[float]) -> None:
        """Ask every backward for the stage's gradient norm of ``norm_type`` (None: stop asking)."""
        self.norm_type = norm_type
        for handle in self.handles.values():
            handle.norm_type = norm_type

    def grad_norms(self, optimizer: Optimizer, norm_type: float) -> list[float]:
        """The gradient norm of ``optimizer``'s part on each expert: as its latest backward answer brought it, else
        by a call."""
        split = self.split_of(optimizer)

        def norm(handle: ExpertHandle) -> float:
            known = handle.norm_after_backward(norm_type)
            return known if known is not None else handle.grad_norm(norm_type)

        return self.each(norm, split.stages) if split is not None else []

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

        def pull(stage: str) -> Any:
            try:
                return self.handles[stage].get_state()
            except ExpertError as e:
                return e

        try:
            self.wait_for_snapshot()
        except Exception:  # noqa: BLE001 - the snapshot is only a fallback here
            log.debug("the last snapshot failed", exc_info=True)
        for stage in self.stages:
            try:
                self.settle(stage)
            except ExpertError as e:  # what the pull below gets from this stage says the rest
                log.warning("stage '%s': the last step did not land (%s)", stage, e)
        pulled = dict(zip(self.stages, self._pool.map(pull, self.stages)))
        states = {}
        for stage, state in pulled.items():
            if not isinstance(state, ExpertError):
                states[stage] = state
            elif stage in self._snapshots:
                step, states[stage] = self._snapshots[stage]
                log.error("DistqatStrategy: could not bring the trained weights of stage '%s' home (%s); the module "
                          "gets its snapshot of step %d (of %d)", stage, state, step, self._steps)
            else:
                log.error("DistqatStrategy: could not bring the trained weights of stage '%s' home (%s); the module "
                          "keeps the weights this stage had when training started", stage, state)
        for stage, state in states.items():
            original = self.originals[stage]
            device = next(original.parameters(), torch.empty(0)).device
            original.load_state_dict({k: v.to(device) for k, v in state["module"].items()})
        for split in self.splits.values():
            merged = self.optimizer_state(split.optimizer, states)
            split.restore()
            split.optimizer.load_state_dict(merged)
