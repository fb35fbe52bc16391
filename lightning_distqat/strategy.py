"""DistqatStrategy: Lightning hook glue. The swarm session lives in ``swarm/membership.py``, the pipeline in
``swarm/pipeline.py``, DiLoCo in ``diloco/``; this module decides when to call them."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable, Mapping, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch.callbacks import Callback, ModelSummary
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim import Optimizer
from typing_extensions import override

from lightning_distqat.callbacks import (CountRemoteStages, DiLoCoCheckpointState, DiLoCoInnerSteps, FleetTelemetry,
                                         SwarmMetrics)
from lightning_distqat.config import QuantConfig, SwarmConfig
from lightning_distqat.diloco.config import DiLoCoConfig
from lightning_distqat.diloco.rounds import TrainerRounds
from lightning_distqat.plugins import ClipAcrossSwarm, mix_in
from lightning_distqat.ranks import LocalRanksStrategy
from lightning_distqat.swarm.membership import SwarmMembership
from lightning_distqat.swarm.overlap import JoinMicroLosses, MicroBatches, batch_rows, first_rows, split_batch
from lightning_distqat.swarm.pipeline import RemotePipeline
from lightning_distqat.swarm.stages import resolve_stages

__all__ = ["DistqatStrategy"]


class DistqatStrategy(LocalRanksStrategy):
    """Train a LightningModule whose ``stages`` (dotted submodule paths) run on swarm experts.

    Args:
        stages: submodules to run remotely, in pipeline order, e.g. ``["backbone.layer1", "head"]``. ``None`` keeps the
            whole model local.
        initial_peers: multiaddrs of a running swarm. ``None`` starts an embedded swarm on this machine: one expert
            process per stage on loopback, stopped at teardown.
        experiment: prefix of every DHT key; trainers and experts of one experiment must share it.
        swarm: further network settings (timeouts, listen addresses); ``experiment``/``initial_peers`` override it.
        diloco: run DiLoCo: every ``inner_steps`` training batches the replicas average pseudo-gradients and take an
            outer step. With ``stages`` every expert of the pipeline does this for its stage (the replicas are the
            other pipelines' experts of that stage); without ``stages`` the whole model is one replica per trainer
            (data-parallel DiLoCo for any LightningModule).
        quant: wire codecs for each stage's activations and gradients, the pseudo-gradient codec of DiLoCo, and
            torchao QAT on the experts.
        spare_experts: unleased experts per stage in the embedded swarm, ready to replace one that dies
            (``SwarmConfig.spare_experts``).
        mirror_every: optimizer steps between snapshots of every stage's state, the state a replacement expert
            starts from (``SwarmConfig.mirror_every``; 1 loses no step when an expert dies).
        micro_batches: cut every training batch into this many micro-batches that move through the stages at once
            (while one waits for an expert, the next one's calls go out), so the experts work concurrently. The
            loss is the micro-batches' losses weighted by their share of the batch, so the gradients equal the whole
            batch's (up to float rounding) when ``training_step`` returns a mean over samples. BatchNorm in a stage
            sees micro-batch statistics instead: keep 1 for models with BatchNorm. Automatic optimization only.

    When the expert of a stage dies, stops answering or leaves, the trainer claims another expert of that stage,
    brings it to the stage's state, replays the step in flight and goes on (``SwarmConfig.failover_timeout`` bounds
    the wait). :meth:`current_experts` says which experts the pipeline uses.

    The swarm's series (``wire/*``, ``diloco/*``) reach the Trainer's loggers through a
    :class:`~lightning_distqat.callbacks.SwarmMetrics` callback, added unless the Trainer has one.
    """

    strategy_name = "distqat"

    def __init__(
        self,
        stages: Optional[Sequence[str]] = None,
        *,
        initial_peers: Optional[Sequence[str]] = None,
        experiment: Optional[str] = None,
        swarm: Optional[SwarmConfig] = None,
        diloco: Optional[DiLoCoConfig] = None,
        quant: Optional[QuantConfig] = None,
        spare_experts: Optional[int] = None,
        mirror_every: Optional[int] = None,
        micro_batches: int = 1,
        accelerator: Optional["pl.accelerators.Accelerator"] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        precision_plugin: Optional[Precision] = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator, parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            precision_plugin=precision_plugin,
        )
        self.stages = [stages] if isinstance(stages, str) else list(stages or [])
        overrides: dict[str, Any] = {"experiment": experiment} if experiment is not None else {}
        if initial_peers is not None:
            overrides["initial_peers"] = list(initial_peers)
        if spare_experts is not None:
            overrides["spare_experts"] = spare_experts
        if mirror_every is not None:
            overrides["mirror_every"] = mirror_every
        self.swarm_config = replace(swarm or SwarmConfig(), **overrides)
        self.quant = quant or QuantConfig(enabled=False)
        codec, block = self.quant.for_stage("").wire_codec("pseudo_gradients")
        if diloco is not None and codec != "none":
            diloco = replace(diloco, pseudo_gradient_codec=codec, codec_block_size=block)
        self.diloco = diloco
        self.membership: Optional[SwarmMembership] = None
        self.diloco_reports: list[dict[str, Any]] = []
        """One entry per outer round: inner step, round, group size, bytes sent/received, checksum per group."""
        self._clip: dict[str, Any] = {}
        self._stepped = False
        self._warned_batch_size = False
        self._wire_done = {"bytes_sent": 0, "bytes_received": 0}
        self._callbacks: list[Callback] = []
        self._diloco_restore: Optional[dict[str, Any]] = None
        self._diloco_final: Optional[dict[str, Any]] = None
        if not isinstance(micro_batches, int) or isinstance(micro_batches, bool) or micro_batches < 1:
            raise ValueError(f"DistqatStrategy: micro_batches must be an int >= 1, got {micro_batches!r}")
        self.micro_batches = micro_batches
        self._micro: Optional[MicroBatches] = None
        self._warned_micro = False

    # ------------------------------------------------------------------ Lightning plumbing
    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # stage weights and optimizer states are restored on the experts, so the swarm must be up

    @property
    @override
    def precision_plugin(self) -> Precision:
        if self._precision_plugin is None:
            self.precision_plugin = Precision()
        return self._precision_plugin

    @precision_plugin.setter
    def precision_plugin(self, plugin: Optional[Precision]) -> None:
        if plugin is not None:
            mix_in(plugin, ClipAcrossSwarm)._distqat_strategy = self
        self._precision_plugin = plugin

    @property
    def pipeline(self) -> Optional[RemotePipeline]:
        """The experts this trainer holds, between setup and teardown (``None`` without stages)."""
        return self.membership.pipeline if self.membership is not None else None

    def current_experts(self) -> dict[str, dict[str, Any]]:
        """For each stage, the expert the pipeline uses now: ``{"peer_id": ..., "pid": ...}`` (``pid`` is None for
        an expert this trainer did not start). Empty outside ``fit``."""
        return self.membership.current_experts() if self.membership is not None else {}

    @property
    def swarm_active(self) -> bool:
        """True between setup and teardown, while stage submodules are replaced by remote proxies."""
        return self.pipeline is not None

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        module = self.lightning_module
        assert module is not None
        originals = resolve_stages(module, self.stages) if self.stages else {}
        if originals or self.diloco is not None:
            self.membership = SwarmMembership(self.swarm_config, originals, quant=self.quant, rank=self.global_rank,
                                              world_size=self.world_size).join()
            for line in self.membership.startup_lines():
                rank_zero_info(f"DistqatStrategy: {line}")
            if self.pipeline is not None:
                self.pipeline.install(module)
            self._attach_callbacks(trainer)
        super().setup(trainer)

    def _attach_callbacks(self, trainer: "pl.Trainer") -> None:
        """The inner-step counter first (a DiLoCo round must end a batch before checkpoints see it), swarm metrics
        unless the user has their own, and remote parameter counts in the model summary."""
        self._callbacks = [DiLoCoInnerSteps(self._end_of_batch)]
        if not any(isinstance(c, SwarmMetrics) for c in trainer.callbacks):
            self._callbacks.append(SwarmMetrics())
        client = self.membership.client if self.membership is not None else None
        if client is not None and self.swarm_config.telemetry_period > 0 and self.global_rank == 0:
            name = self.swarm_config.trainer_name or client.peer_id
            self._callbacks.append(FleetTelemetry(client.dht, self.swarm_config.experiment, name,
                                                  self.swarm_config.telemetry_period))
        trainer.callbacks.insert(0, self._callbacks[0])
        trainer.callbacks.extend(self._callbacks[1:])
        if self.diloco is not None and not any(isinstance(c, DiLoCoCheckpointState) for c in trainer.callbacks):
            trainer.callbacks.append(DiLoCoCheckpointState(self))  # stays: a checkpoint after fit keeps the state
        for callback in trainer.callbacks:
            if isinstance(callback, ModelSummary):
                mix_in(callback, CountRemoteStages)

    @override
    def setup_optimizers(self, trainer: "pl.Trainer") -> None:
        if self.pipeline is None:
            return super().setup_optimizers(trainer)
        with self.pipeline.originals_in_place(self.lightning_module):
            super().setup_optimizers(trainer)
        started = time.monotonic()
        self.pipeline.configure(self.optimizers)
        if trainer.gradient_clip_val and trainer.gradient_clip_algorithm in (None, "norm"):
            self.pipeline.clip_by_norm(2.0)  # as Lightning clips: backward answers bring the experts' grad norms
        self.membership.timings["configure"] = time.monotonic() - started

    # ------------------------------------------------------------------ training
    @override
    def on_train_start(self) -> None:
        """Join the DiLoCo averaging groups (after any checkpoint was restored, so the outer state starts from it)."""
        super().on_train_start()
        self._start_rounds()
        if self.pipeline is not None:  # the state a replacement starts from until the first mirror_every steps
            self.pipeline.snapshot()

    def _start_rounds(self) -> None:
        if self.diloco is None or self.membership is None:
            return
        assert self.lightning_module is not None
        local = [p for p in self.lightning_module.parameters() if p.requires_grad]
        restore, self._diloco_restore = self._diloco_restore, None
        start = self.membership.start_rounds(self.diloco, local, restore)
        self.diloco_reports = self.membership.rounds.reports
        rank_zero_info(f"DistqatStrategy: DiLoCo on, an outer round every {self.diloco.inner_steps} inner steps "
                       f"(starting at round {start}{'; alone in this swarm' if self.membership.solo else ''})")

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        rounds = self.membership.rounds if self.membership is not None else None
        if rounds is not None and args:
            args = (self._replica_share(rounds, args[0]), *args[1:])
            rounds.samples_since_round += self._batch_size(args[0])
        parts = self._micro_batches_of(args[0] if args else None)
        if parts is None:
            return super().training_step(*args, **kwargs)
        if self._micro is None:
            self._micro = MicroBatches(self.micro_batches)
        outputs = self._micro.run(lambda part: super(DistqatStrategy, self).training_step(part[0], *args[1:], **kwargs),
                                  parts)
        return self._join(outputs, [n / sum(n for _, n in parts) for _, n in parts])

    @staticmethod
    def _replica_share(rounds: TrainerRounds, batch: Any) -> Any:
        """The rows of ``batch`` this DiLoCo replica trains on: all of them, or its (fixed or adapted)
        ``batch_size`` first rows."""
        rows = batch_rows(batch)
        if rows is None:
            return batch
        rounds.full_batch = max(rounds.full_batch, rows)
        return first_rows(batch, rounds.batch_size) if rounds.batch_size and rounds.batch_size < rows else batch

    def _micro_batches_of(self, batch: Any) -> Optional[list[tuple[Any, int]]]:
        """The micro-batches of a training batch, or None to run it whole (one micro-batch, no pipeline, manual
        optimization, or a batch without tensors to cut)."""
        module = self.lightning_module
        if self.micro_batches <= 1 or self.pipeline is None or module is None or not module.automatic_optimization:
            if self.micro_batches > 1 and module is not None and not module.automatic_optimization \
                    and not self._warned_micro:
                self._warned_micro = True
                rank_zero_warn("DistqatStrategy: micro_batches applies to automatic optimization only; this module "
                               "optimizes manually, so every batch runs whole.")
            return None
        parts = split_batch(batch, self.micro_batches)
        if parts is None and not self._warned_micro:
            self._warned_micro = True
            rank_zero_warn(f"DistqatStrategy: cannot cut a {type(batch).__name__} batch into micro-batches (it holds "
                           "no tensor with a batch dimension); every batch runs whole.")
        return parts if parts is not None and len(parts) > 1 else None

    def _join(self, outputs: list[Any], weights: list[float]) -> Any:
        """The micro-batches' ``training_step`` outputs as one: their losses weighted by their share of the batch
        (the whole batch's mean loss), its backward running theirs concurrently; other values of a dict output are
        the last micro-batch's."""
        losses = [o["loss"] if isinstance(o, Mapping) else o for o in outputs]
        if not all(isinstance(loss, torch.Tensor) and loss.requires_grad for loss in losses):
            raise MisconfigurationException(
                "DistqatStrategy(micro_batches>1): training_step must return the loss (a tensor that requires grad, "
                "or a dict with 'loss') for every micro-batch; return it, or set micro_batches=1.")
        dummy = torch.empty(0, device=losses[0].device, requires_grad=True)
        joined = JoinMicroLosses.apply(dummy, self._micro, weights, losses)
        last = outputs[-1]
        return {**last, "loss": joined} if isinstance(last, Mapping) else joined

    def _batch_size(self, batch: Any) -> int:
        try:
            return extract_batch_size(batch)
        except Exception as e:  # noqa: BLE001 - Lightning raises its MisconfigurationException for batches it cannot size
            if not self._warned_batch_size:
                self._warned_batch_size = True
                rank_zero_warn(f"DistqatStrategy: cannot tell the size of a {type(batch).__name__} batch ({e}); DiLoCo "
                               "weighs this replica's pseudo-gradients by batches instead of samples. Return batches "
                               "that hold tensors to weigh by samples.")
            return 1

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Optional[Any] = None,
                       **kwargs: Any) -> Any:
        result = super().optimizer_step(optimizer, closure, model, **kwargs)  # closure, clipping, local step
        clip, self._clip = self._clip, {}  # set by clipping in the closure, or before the step (manual optimization)
        if self.pipeline is not None:
            self.pipeline.step(optimizer, **clip)
        self._stepped = True
        return result

    def _end_of_batch(self) -> None:
        """A training batch ended: one inner step if its optimizers stepped (whatever their number)."""
        rounds = self.membership.rounds if self.membership is not None else None
        pipeline = self.pipeline
        if self._stepped and pipeline is not None:
            pipeline.step_done()
        if self._stepped and rounds is not None:
            rounds.inner_step_done()
        if self._stepped and pipeline is not None:
            pipeline.snapshot_if_due()
        self._stepped = False

    def wire_bytes(self) -> dict[str, int]:
        """Tensor bytes sent to and received from the experts by forward/backward calls of the current (or last)
        fit (after encoding)."""
        return self.pipeline.wire_bytes() if self.pipeline is not None else dict(self._wire_done)

    def clip_grad_norm(self, optimizer: Optimizer, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """``clip_grad_norm_`` over the local parameters and every stage's parameters together."""
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        remote = self.pipeline.grad_norms(optimizer, norm_type) if self.pipeline is not None else []
        norms = [p.grad for p in params] + [torch.tensor(n) for n in remote]
        if not norms:
            return torch.tensor(0.0)
        total = torch.nn.utils.get_total_norm(norms, norm_type)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        self._clip["clip_norm"] = (float(max_norm), float(total))
        return total

    def clip_grad_value(self, optimizer: Optimizer, clip_value: float) -> None:
        torch.nn.utils.clip_grad_value_([p for g in optimizer.param_groups for p in g["params"]], clip_value)
        self._clip["clip_value"] = float(clip_value)

    # ------------------------------------------------------------------ checkpoints
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = super().lightning_module_state_dict()
        if self.pipeline is not None:
            state.update(self.pipeline.module_state_dict())
        return state

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if self.pipeline is None:
            return super().load_model_state_dict(checkpoint, strict)
        assert self.lightning_module is not None
        self.pipeline.load_module_state(checkpoint["state_dict"], self.lightning_module, strict)

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if self.pipeline is None or self.pipeline.split_of(optimizer) is None:
            return super().optimizer_state(optimizer)
        return self.pipeline.optimizer_state(optimizer)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        if self.pipeline is None:
            return super().load_optimizer_state_dict(checkpoint)
        self.pipeline.load_optimizer_states(self.optimizers, checkpoint["optimizer_states"])

    def diloco_state(self) -> Optional[dict[str, Any]]:
        """The DiLoCo outer state of this replica (see ``TrainerRounds.state_dict``): live during ``fit``, the final
        one after it; None without DiLoCo."""
        rounds = self.membership.rounds if self.membership is not None else None
        return rounds.state_dict() if rounds is not None else self._diloco_final

    def restore_diloco_state(self, state: Optional[dict[str, Any]]) -> None:
        """A checkpoint's DiLoCo outer state, loaded when the rounds start (after the weights were restored)."""
        self._diloco_restore = state

    # ------------------------------------------------------------------ teardown
    @override
    def teardown(self) -> None:
        """Bring the trained weights home (also after an error or Ctrl+C), put the original submodules and parameter
        groups back, then leave the swarm."""
        membership, pipeline, module = self.membership, self.pipeline, self.lightning_module
        micro, self._micro = self._micro, None
        if micro is not None:
            micro.close()  # after a failure or Ctrl+C its threads end with their calls (bounded by request_timeout)
        try:
            if membership is not None and membership.rounds is not None:
                try:
                    self._diloco_final = membership.rounds.state_dict(failover=False)
                except Exception as e:  # noqa: BLE001 - an expert that cannot answer; the weights still come home
                    rank_zero_warn(f"DistqatStrategy: could not keep the final DiLoCo outer state ({e})")
            if membership is not None:
                membership.leave(bring_home=True)
        finally:
            self.membership = None
            if pipeline is not None:
                self._wire_done = pipeline.wire_bytes()
                pipeline.restore_optimizers()
                if module is not None:
                    pipeline.uninstall(module)
            trainer = module.trainer if module is not None and module._trainer is not None else None
            for callback in self._callbacks:
                if trainer is not None and callback in trainer.callbacks:
                    trainer.callbacks.remove(callback)
            self._callbacks = []
            super().teardown()
