"""The stage an expert hosts: its module, its optimizers, and the activations kept between forward and backward.

Pure torch, no networking: the servicer calls these methods from a single worker thread, so nothing here is
concurrent.
"""

from __future__ import annotations

import importlib
import inspect
import time
from collections import OrderedDict
from typing import Any, Optional, Sequence

import torch
from torch import nn

from lightning_distqat.swarm.records import stage_fingerprint

__all__ = ["StageBackend", "StageError", "build_call", "import_optimizer"]


class StageError(RuntimeError):
    """A request the stage could not serve; the message is sent back to the trainer as is."""


def import_optimizer(path: str) -> type[torch.optim.Optimizer]:
    """Import ``"package.module.Class"`` and check that it is a torch optimizer."""
    module_name, _, cls_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise StageError(f"optimizer class {path!r} cannot be imported on this expert ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise StageError(f"{path!r} is not a torch.optim.Optimizer subclass")
    return cls


def build_call(layout: dict[str, Any], tensors: Sequence[torch.Tensor]) -> tuple[list[Any], dict[str, Any]]:
    """Rebuild ``(args, kwargs)`` from a call layout (see ``RemoteStage``) and the tensors that came with it."""
    tensors = list(tensors)

    def _take(entry: Any) -> Any:
        if entry == "t":
            if not tensors:
                raise StageError("request carries fewer tensors than its layout names")
            return tensors.pop(0)
        return entry[1]

    args = [_take(entry) for entry in layout.get("args", [])]
    kwargs = {name: _take(entry) for name, entry in layout.get("kwargs", {}).items()}
    if tensors:
        raise StageError(f"request carries {len(tensors)} more tensors than its layout names")
    return args, kwargs


class StageBackend:
    """One stage's module with its optimizers and saved forward contexts."""

    def __init__(self, name: str, module: nn.Module, *, device: str = "cpu", max_pending: int = 64) -> None:
        self.name = name
        self.device = torch.device(device)
        self.module = module.to(self.device)
        self.fingerprint = stage_fingerprint(module)
        self.max_pending = max_pending
        self.optimizers: dict[int, torch.optim.Optimizer] = {}
        self._param_names = {p: n for n, p in self.module.named_parameters()}
        self._params = dict(self.module.named_parameters())
        self._pending: "OrderedDict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]" = OrderedDict()
        self._dropped: "OrderedDict[str, None]" = OrderedDict()
        self._answered: "OrderedDict[str, list[Optional[torch.Tensor]]]" = OrderedDict()
        """The last few backward answers, so that a repeated backward (its answer was lost) is answered again
        without accumulating the parameter gradients twice."""
        self.samples_seen = 0
        self.busy_seconds = 0.0
        self.qat: Optional[tuple[str, int]] = None

    # ------------------------------------------------------------------ forward / backward
    def forward(
        self, request_id: str, layout: dict[str, Any], tensors: list[torch.Tensor], *, training: bool, need_grad: bool
    ) -> tuple[list[torch.Tensor], bool]:
        """Run the stage. Returns the output tensors and whether the module returned a tuple."""
        start = time.perf_counter()
        args, kwargs = build_call(layout, [t.to(self.device) for t in tensors])
        leaves = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if need_grad:
            for t in leaves:
                if t.is_floating_point():
                    t.requires_grad_(True)
        self.module.train(training)
        with torch.set_grad_enabled(need_grad):
            out = self.module(*args, **kwargs)
        is_tuple = isinstance(out, (tuple, list))
        outputs = list(out) if is_tuple else [out]
        for i, o in enumerate(outputs):
            if not isinstance(o, torch.Tensor):
                raise StageError(f"stage output {i} is a {type(o).__name__}; stages must return tensors")
        if need_grad:
            self._pending[request_id] = (leaves, outputs)
            while len(self._pending) > self.max_pending:
                dropped, _ = self._pending.popitem(last=False)
                self._dropped[dropped] = None
                while len(self._dropped) > 10 * self.max_pending:
                    self._dropped.popitem(last=False)
        self._account(start, outputs)
        return [o.detach() for o in outputs], is_tuple

    def backward(self, request_id: str, grad_outputs: list[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        """Backpropagate through a saved forward; accumulate parameter grads; return grads of the float inputs."""
        start = time.perf_counter()
        if request_id in self._answered:  # the trainer asks again: its first answer got lost on the way
            return self._answered[request_id]
        if request_id not in self._pending:
            if request_id in self._dropped:
                raise StageError(
                    f"activations of forward {request_id} were dropped: more than {self.max_pending} forwards waited "
                    "for backward (raise ExpertConfig.max_pending_backward)"
                )
            raise StageError(f"no forward with id {request_id} is waiting for backward on this expert")
        leaves, outputs = self._pending[request_id]
        pairs = [(o, g.to(self.device)) for o, g in zip(outputs, grad_outputs) if o.requires_grad and g is not None]
        if len(grad_outputs) != len(outputs):
            raise StageError(f"backward got {len(grad_outputs)} output grads for {len(outputs)} outputs")
        for o, g in pairs:
            if o.shape != g.shape or o.dtype != g.dtype:
                raise StageError(
                    f"output grad has shape {tuple(g.shape)} dtype {g.dtype}, expected {tuple(o.shape)} {o.dtype}"
                )
        del self._pending[request_id]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads = [t.grad if t.requires_grad else None for t in leaves]
        self._answered[request_id] = grads
        while len(self._answered) > 4:
            self._answered.popitem(last=False)
        self.busy_seconds += time.perf_counter() - start
        return grads

    def _account(self, start: float, outputs: list[torch.Tensor]) -> None:
        self.busy_seconds += time.perf_counter() - start
        if outputs and outputs[0].dim() > 0:
            self.samples_seen += outputs[0].shape[0]

    def trainable_params(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    @property
    def throughput(self) -> float:
        return self.samples_seen / self.busy_seconds if self.busy_seconds > 0 else 0.0

    # ------------------------------------------------------------------ optimizers
    def prepare_qat(self, scheme: Optional[str], group_size: int) -> None:
        """Insert torchao fake quantizers (before any optimizer exists: they keep the same parameters)."""
        if scheme is None or self.qat == (scheme, group_size):
            return
        if self.qat is not None:
            raise StageError(f"stage '{self.name}' is already prepared for QAT {self.qat}; restart the expert to "
                             f"change the scheme")
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

    def configure_optimizer(self, index: int, spec: dict[str, Any]) -> None:
        """Create optimizer ``index`` from a spec: ``{"cls": path, "defaults": {...}, "groups": [{..., "param_names"}]}``.

        Groups keep the user's group order, so hyperparameters sent with every step map one to one.
        """
        cls = import_optimizer(spec["cls"])
        groups = []
        for group in spec["groups"]:
            names = group["param_names"]
            missing = [n for n in names if n not in self._params]
            if missing:
                raise StageError(f"optimizer names parameters {missing} that stage '{self.name}' does not have")
            hparams = {k: v for k, v in group.items() if k != "param_names"}
            groups.append({**hparams, "params": [self._params[n] for n in names]})
        accepted = inspect.signature(cls.__init__).parameters
        defaults = {k: v for k, v in spec.get("defaults", {}).items() if k in accepted}
        self.optimizers[index] = cls(groups, **defaults)

    def grad_norm(self, norm_type: float = 2.0) -> float:
        """Norm of this stage's gradients (as ``torch.nn.utils.clip_grad_norm_`` computes it, before clipping)."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        norms = [torch.linalg.vector_norm(g, norm_type) for g in grads]
        return float(torch.linalg.vector_norm(torch.stack(norms), norm_type))

    def step(
        self,
        index: int,
        group_hparams: list[dict[str, Any]],
        *,
        grad_scale: Optional[float] = None,
        clip_value: Optional[float] = None,
    ) -> None:
        """One inner optimizer step with the trainer's current hyperparameters, then zero the grads."""
        if index not in self.optimizers:
            raise StageError(f"optimizer {index} was never configured on stage '{self.name}'")
        optimizer = self.optimizers[index]
        if len(group_hparams) != len(optimizer.param_groups):
            raise StageError(f"step sent {len(group_hparams)} param groups, optimizer has {len(optimizer.param_groups)}")
        for group, hparams in zip(optimizer.param_groups, group_hparams):
            group.update(hparams)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grad_scale is not None and params:
            torch._foreach_mul_([p.grad for p in params], grad_scale)
        if clip_value is not None:
            for p in params:
                p.grad.clamp_(-clip_value, clip_value)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._pending.clear()  # any forward not yet backpropagated belongs to a finished step

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
