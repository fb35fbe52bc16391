"""The stage an expert hosts: its module, its optimizers, and the activations kept between forward and backward.

Pure torch, no networking: the servicer calls these methods from a single worker thread, so nothing here is
concurrent. What comes from the network is checked before it touches the stage (``expert/checks.py``): optimizer
classes from an allowlist, known plain hyperparameters, finite activations and gradients, saved activations within a
byte budget.
"""

from __future__ import annotations

import inspect
import time
from collections import OrderedDict
from typing import Any, Optional, Sequence

import torch
from hivemind.utils.performance_ema import PerformanceEMA
from torch import nn

from lightning_distqat.expert.checks import NOT_FINITE, SCHEDULER_KEYS, OptimizerAllowlist, check_finite, plain_hparams
from lightning_distqat.swarm.messages import LayoutError, flatten_structure, pack_structure
from lightning_distqat.swarm.records import stage_fingerprint

__all__ = ["StageBackend", "StageError", "build_call"]


class StageError(RuntimeError):
    """A request the stage could not serve; the message is sent back to the trainer as is."""


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build_call(layout: dict[str, Any], tensors: Sequence[torch.Tensor]) -> tuple[list[Any], dict[str, Any]]:
    """Rebuild ``(args, kwargs)`` from a call layout (``messages.flatten_structure``) and its tensors."""
    try:
        args, kwargs = pack_structure(layout, tensors)
    except (ValueError, KeyError, TypeError, StopIteration) as e:
        raise StageError(f"the request's layout does not match its tensors ({type(e).__name__}: {e})") from None
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
        raise StageError("the request's layout is not (args, kwargs)")
    return list(args), kwargs


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same_kind(current: Any, new: Any) -> bool:
    """A hyperparameter update keeps the kind of value a group holds: a number stays a number (an LR scheduler
    may turn an int into a float), a bool a bool, a tuple a tuple of the same length, None None."""
    if _number(current):
        return _number(new)
    if isinstance(current, (tuple, list)):
        return isinstance(new, (tuple, list)) and len(new) == len(current) and all(
            _same_kind(c, n) for c, n in zip(current, new))
    if isinstance(current, torch.Tensor):  # e.g. a tensor lr: replaced by a number
        return _number(new)
    return type(current) is type(new)


_WARM = False


def warm_up() -> None:
    """Pay, once per process, what torch spends on its first optimizer (lazy imports, about 0.9 s here), so that a
    spare expert taking over, or the trainer's first configure, does not wait for it."""
    global _WARM
    if not _WARM:
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
        _WARM = True


class StageBackend:
    """One stage's module with its optimizers and saved forward contexts."""

    def __init__(self, name: str, module: nn.Module, *, device: str = "cpu", max_pending: int = 64,
                 max_pending_bytes: int = 2**30, allowlist: Optional[OptimizerAllowlist] = None) -> None:
        self.name = name
        self.device = torch.device(device)
        self.module = module.to(self.device)
        self.fingerprint = stage_fingerprint(module)
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        """Budget of the activations kept for backward (inputs and outputs of the saved forwards)."""
        self.allowlist = allowlist or OptimizerAllowlist()
        self.optimizers: dict[int, torch.optim.Optimizer] = {}
        self._param_names = {p: n for n, p in self.module.named_parameters()}
        self._params = dict(self.module.named_parameters())
        self._pending: "OrderedDict[str, tuple[list[torch.Tensor], list[torch.Tensor], int]]" = OrderedDict()
        self._pending_bytes = 0
        self._dropped: "OrderedDict[str, None]" = OrderedDict()
        self._answered: "OrderedDict[str, list[Optional[torch.Tensor]]]" = OrderedDict()
        """The last few backward answers, so that a repeated backward (its answer was lost) is answered again
        without accumulating the parameter gradients twice."""
        self.performance = PerformanceEMA(alpha=0.1, paused=True)
        """Recent samples per second of forward and backward work (an exponential moving average)."""
        self.qat: Optional[tuple[str, int]] = None

    # ------------------------------------------------------------------ forward / backward
    def forward(
        self, request_id: str, layout: dict[str, Any], tensors: list[torch.Tensor], *, training: bool, need_grad: bool
    ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """Run the stage. Returns the output's tensors and its layout (``messages.flatten_structure``).

        A forward that can change the stage (``training``: BatchNorm statistics; ``need_grad``: gradients later) takes
        finite inputs only."""
        start = time.perf_counter()
        if training or need_grad:
            try:
                check_finite(tensors, f"stage '{self.name}' input")
            except ValueError as e:
                raise StageError(str(e)) from None
        leaves = [t.to(self.device) for t in tensors]
        if need_grad:
            for t in leaves:
                if t.is_floating_point():
                    t.requires_grad_(True)
        args, kwargs = build_call(layout, leaves)
        self.module.train(training)
        with torch.set_grad_enabled(need_grad):
            out = self.module(*args, **kwargs)
        try:
            out_layout, outputs = flatten_structure(out, "the stage's output")
        except LayoutError as e:
            raise StageError(str(e)) from None
        if need_grad:
            self._keep(request_id, leaves, outputs)
        self._account(start, leaves)
        return [o.detach() for o in outputs], out_layout

    def _keep(self, request_id: str, leaves: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        """Save a forward for its backward, dropping the oldest ones beyond ``max_pending`` or the byte budget."""
        self._forget(request_id)
        size = _nbytes(leaves) + _nbytes(outputs)
        if size > self.max_pending_bytes:
            raise StageError(f"this forward keeps {size / 2**20:.0f} MiB for backward, more than the expert's budget "
                             f"of {self.max_pending_bytes / 2**20:.0f} MiB (ExpertConfig.max_pending_bytes)")
        self._pending[request_id] = (leaves, outputs, size)
        self._pending_bytes += size
        while len(self._pending) > self.max_pending or self._pending_bytes > self.max_pending_bytes:
            dropped = next(iter(self._pending))
            self._forget(dropped)
            self._dropped[dropped] = None
            while len(self._dropped) > 10 * self.max_pending:
                self._dropped.popitem(last=False)

    def _forget(self, request_id: str) -> None:
        kept = self._pending.pop(request_id, None)
        if kept is not None:
            self._pending_bytes -= kept[2]

    def backward(self, request_id: str, grad_outputs: list[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        """Backpropagate through a saved forward; accumulate parameter grads; return grads of the float inputs.

        Output gradients must be finite: a NaN would reach every parameter gradient of the stage."""
        start = time.perf_counter()
        if request_id in self._answered:  # the trainer asks again: its first answer got lost on the way
            return self._answered[request_id]
        if request_id not in self._pending:
            if request_id in self._dropped:
                raise StageError(
                    f"activations of forward {request_id} were dropped: more than {self.max_pending} forwards or "
                    f"{self.max_pending_bytes / 2**20:.0f} MiB waited for backward (raise ExpertConfig."
                    "max_pending_backward or max_pending_bytes)"
                )
            raise StageError(f"no forward with id {request_id} is waiting for backward on this expert")
        leaves, outputs, _ = self._pending[request_id]
        if len(grad_outputs) != len(outputs):
            raise StageError(f"backward got {len(grad_outputs)} output grads for {len(outputs)} outputs")
        try:
            check_finite(grad_outputs, f"gradient of stage '{self.name}' output")
        except ValueError as e:
            raise StageError(str(e)) from None
        pairs = [(o, g.to(self.device)) for o, g in zip(outputs, grad_outputs) if o.requires_grad and g is not None]
        for o, g in pairs:
            if o.shape != g.shape or o.dtype != g.dtype:
                raise StageError(
                    f"output grad has shape {tuple(g.shape)} dtype {g.dtype}, expected {tuple(o.shape)} {o.dtype}"
                )
        self._forget(request_id)
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads = [t.grad if t.requires_grad else None for t in leaves]
        self._answered[request_id] = grads
        while len(self._answered) > 4:
            self._answered.popitem(last=False)
        self._account(start, leaves)
        return grads

    def _account(self, start: float, inputs: list[torch.Tensor]) -> None:
        """Count a forward or backward of ``inputs`` (their leading dimension is the batch) in :attr:`performance`."""
        samples = inputs[0].shape[0] if inputs and inputs[0].dim() > 0 else 1
        self.performance.update(max(1, samples), interval=time.perf_counter() - start)

    def trainable_params(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    @property
    def throughput(self) -> float:
        """Recent samples per second of this stage's forward and backward work (0 before any)."""
        return self.performance.samples_per_second if self.performance.num_updates else 0.0

    # ------------------------------------------------------------------ optimizers
    def new_holder(self) -> None:
        """A trainer other than the last one holds the lease now: nothing of the last one's work carries over (its
        accumulated gradients, saved activations and answers). Weights, optimizer state and DiLoCo state stay."""
        for p in self._params.values():
            p.grad = None
        for request_id in list(self._pending):
            self._forget(request_id)
        self._dropped.clear()
        self._answered.clear()

    def prepare_qat(self, scheme: Optional[str], group_size: int) -> None:
        """Insert torchao fake quantizers (before any optimizer exists: they keep the same parameters). ``scheme``
        None asks for a stage without QAT, refused when the stage already has it (fake quantizers cannot be taken
        out of a running stage)."""
        if self.qat == ((scheme, group_size) if scheme is not None else None):
            return
        if self.qat is not None:
            raise StageError(f"stage '{self.name}' is already prepared for QAT {self.qat} by an earlier trainer; "
                             f"this one asks for {scheme!r}: use the same quant.qat, or restart the expert")
        if self.optimizers:
            raise StageError(f"stage '{self.name}': QAT must be prepared before the optimizers are configured")
        from lightning_distqat.quant.qat import prepare

        try:
            prepare(self.module, scheme, group_size, where=f"stage '{self.name}'")
        except ValueError as e:
            raise StageError(str(e)) from None
        self._params = dict(self.module.named_parameters())
        self._param_names = {p: n for n, p in self._params.items()}
        self.qat = (scheme, group_size)

    def configure_optimizer(self, index: int, spec: dict[str, Any], peer: Optional[str] = None) -> None:
        """Create optimizer ``index`` from a spec: ``{"cls": path, "defaults": {...}, "groups": [{..., "param_names"}]}``
        sent by ``peer``: the class from the allowlist, known and plain hyperparameters only.

        Groups keep the user's group order, so hyperparameters sent with every step map one to one.
        """
        try:
            cls = self.allowlist.resolve(spec.get("cls"), peer)
            accepted = {k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "params")}
            defaults = plain_hparams({k: v for k, v in spec.get("defaults", {}).items() if k in accepted}, accepted,
                                     f"{cls.__name__} defaults")
            groups, group_hparams = [], []
            for i, group in enumerate(spec["groups"]):
                names = group.get("param_names") if isinstance(group, dict) else None
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    raise ValueError(f"param group {i} must name its parameters (a list of str)")
                missing = [n for n in names if n not in self._params]
                if missing:
                    raise ValueError(f"optimizer names parameters {missing} that stage '{self.name}' does not have")
                groups.append({"params": [self._params[n] for n in names]})
                group_hparams.append({k: v for k, v in group.items() if k != "param_names"})
            optimizer = cls(groups, **defaults)
            known = set(optimizer.defaults) | set(SCHEDULER_KEYS)  # a group's keys: the optimizer's own, and
            for i, (group, hparams) in enumerate(zip(optimizer.param_groups, group_hparams)):  # schedulers'
                group.update(plain_hparams(hparams, known, f"param group {i}"))
        except (ValueError, TypeError, KeyError) as e:
            raise StageError(f"stage '{self.name}': optimizer {index} cannot be configured ({e})") from None
        self.optimizers[index] = optimizer

    def grad_norm(self, norm_type: float = 2.0) -> float:
        """Norm of this stage's gradients (``torch.nn.utils.get_total_norm``, as clipping computes it)."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads, norm_type)) if grads else 0.0

    def step(
        self,
        index: int,
        group_hparams: list[dict[str, Any]],
        *,
        clip_norm: Optional[Sequence[float]] = None,
        clip_value: Optional[float] = None,
    ) -> Optional[str]:
        """One inner optimizer step with the trainer's current hyperparameters, then zero the grads. Returns why the
        update was skipped (gradients that are not finite), or None.

        ``group_hparams`` may change the values of a group's existing hyperparameters only (never its parameters).
        ``clip_norm``: ``(max_norm, total_norm)``, clipping by the norm over every stage (the trainer computed it);
        ``clip_value``: clipping by value."""
        if index not in self.optimizers:
            raise StageError(f"optimizer {index} was never configured on stage '{self.name}'")
        optimizer = self.optimizers[index]
        if not isinstance(group_hparams, list) or len(group_hparams) != len(optimizer.param_groups):
            raise StageError(f"step must send the hyperparameters of the optimizer's {len(optimizer.param_groups)} "
                             "param groups")
        try:
            updates = [plain_hparams(h, [k for k in g if k != "params"], f"param group {i}")
                       for i, (g, h) in enumerate(zip(optimizer.param_groups, group_hparams))]
            clip = plain_hparams({"clip_norm": clip_norm, "clip_value": clip_value}, ["clip_norm", "clip_value"],
                                 "clipping")
            for i, (group, hparams) in enumerate(zip(optimizer.param_groups, updates)):
                for key, value in hparams.items():
                    if not _same_kind(group[key], value):
                        raise ValueError(f"param group {i}: {key}={value!r} is not of the kind of the current "
                                         f"{group[key]!r}")
            if clip["clip_norm"] is not None and (
                    len(clip["clip_norm"]) != 2 or not all(_number(v) and v >= 0 for v in clip["clip_norm"])):
                raise ValueError("clip_norm is (max_norm, total_norm), two numbers >= 0")
            if clip["clip_value"] is not None and not (_number(clip["clip_value"]) and clip["clip_value"] >= 0):
                raise ValueError("clip_value is a number >= 0")
        except (ValueError, TypeError) as e:
            raise StageError(f"stage '{self.name}': step refused ({e})") from None
        self._pending.clear()  # any forward not yet backpropagated belongs to a finished step
        self._pending_bytes = 0
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        try:
            check_finite([p.grad for p in params], f"stage '{self.name}' gradient")
        except ValueError:
            optimizer.zero_grad(set_to_none=True)
            return f"stage '{self.name}': the gradients hold {NOT_FINITE}; this update was skipped"
        for group, hparams in zip(optimizer.param_groups, updates):
            group.update(hparams)
        if clip["clip_norm"] is not None and params:
            max_norm, total_norm = clip["clip_norm"]
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.tensor(float(total_norm)))
        if clip["clip_value"] is not None and params:
            torch.nn.utils.clip_grad_value_(params, clip["clip_value"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return None

    # ------------------------------------------------------------------ state
    def get_state(self) -> dict[str, Any]:
        """Module state dict and optimizer states keyed by parameter name."""
        return {
            "module": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
            "optimizers": {i: self._named_optimizer_state(opt) for i, opt in self.optimizers.items()},
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Load what :meth:`get_state` returned (either part may be missing). Validates before changing anything."""
        module_state = state.get("module")
        if module_state is not None:
            own = self.module.state_dict()
            problems = [k for k in own if k not in module_state] + [k for k in module_state if k not in own]
            problems += [k for k in own if k in module_state and own[k].shape != module_state[k].shape]
            if problems:
                raise StageError(f"state for stage '{self.name}' does not match its module (keys {problems[:5]})")
            self.module.load_state_dict(module_state)
        for index, named in state.get("optimizers", {}).items():
            if int(index) not in self.optimizers:
                raise StageError(f"state names optimizer {index}, which is not configured on stage '{self.name}'")
            self._load_named_optimizer_state(self.optimizers[int(index)], named)

    def _named_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        groups, state = [], {}
        for group in optimizer.param_groups:
            names = [self._param_names[p] for p in group["params"]]
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "param_names": names})
            for p, n in zip(group["params"], names):
                if p in optimizer.state:
                    state[n] = dict(optimizer.state[p])
        return {"state": state, "param_groups": groups}

    def _load_named_optimizer_state(self, optimizer: torch.optim.Optimizer, named: dict[str, Any]) -> None:
        order = [self._param_names[p] for g in optimizer.param_groups for p in g["params"]]
        index = {n: i for i, n in enumerate(order)}
        groups, pos = [], 0
        for group, saved in zip(optimizer.param_groups, named["param_groups"]):
            ids = list(range(pos, pos + len(group["params"])))
            pos += len(group["params"])
            groups.append({**{k: v for k, v in saved.items() if k != "param_names"}, "params": ids})
        optimizer.load_state_dict(
            {"state": {index[n]: s for n, s in named["state"].items()}, "param_groups": groups}
        )
