"""DistqatStrategy: Lightning hook glue. The networking lives in ``swarm/`` and ``expert/``; this module decides when
to call it."""

from __future__ import annotations

import atexit
from dataclasses import replace
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.data import extract_batch_size
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_distqat.config import ExpertConfig, QuantConfig, SwarmConfig
from lightning_distqat.diloco import DiLoCoConfig
from lightning_distqat.swarm.embedded import EmbeddedSwarm, refuse_in_spawned_child
from lightning_distqat.swarm.optimizers import OptimizerSplit
from lightning_distqat.swarm.pipeline import SwarmClient
from lightning_distqat.swarm.records import stage_fingerprint
from lightning_distqat.swarm.remote import ExpertError, ExpertHandle, RemoteStage
from lightning_distqat.swarm.rendezvous import Rendezvous
from lightning_distqat.swarm.rounds import TrainerRounds
from lightning_distqat.swarm.stages import resolve_stages, set_submodule

__all__ = ["DistqatStrategy"]

log = logging.getLogger(__name__)


class DistqatStrategy(ParallelStrategy):
    """Train a LightningModule whose ``stages`` (dotted submodule paths) run on swarm experts.

    Args:
        stages: submodules to run remotely, in pipeline order, e.g. ``["backbone.layer1", "head"]``. ``None`` keeps the
            whole model local.
        initial_peers: multiaddrs of a running swarm. ``None`` starts an embedded swarm on this machine: a DHT node and
            one expert process per stage on loopback, stopped at teardown.
        experiment: prefix of every DHT key; trainers and experts of one experiment must share it.
        swarm: further network settings (timeouts, listen addresses); ``experiment``/``initial_peers`` override it.
        diloco: run DiLoCo: every ``inner_steps`` optimizer steps the replicas average pseudo-gradients and take an
            outer step. With ``stages`` every expert of the pipeline does this for its stage (the replicas are the
            other pipelines' experts of that stage); without ``stages`` the whole model is one replica per trainer
            (data-parallel DiLoCo for any LightningModule).
        quant: wire codecs for each stage's activations and gradients (bytes are logged as ``wire/bytes_sent`` and
            ``wire/bytes_received``), the pseudo-gradient codec of DiLoCo, and torchao QAT on the experts.
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
        accelerator: Optional["pl.accelerators.Accelerator"] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        precision_plugin: Optional[Precision] = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator, parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            precision_plugin=precision_plugin,
        )
        self._num_nodes = 1
        self._rendezvous: Optional[Rendezvous] = None
        if isinstance(stages, str):
            stages = [stages]
        self.stages = list(stages or [])
        self.swarm_config = swarm or SwarmConfig()
        if experiment is not None:
            self.swarm_config.experiment = experiment
        if initial_peers is not None:
            self.swarm_config.initial_peers = list(initial_peers)
        self._client: Optional[SwarmClient] = None
        self._embedded: Optional[EmbeddedSwarm] = None
        self._originals: dict[str, nn.Module] = {}
        self._handles: dict[str, ExpertHandle] = {}
        self._splits: dict[int, OptimizerSplit] = {}
        self._pending: dict[str, Any] = {}
        self._pool: Optional[ThreadPoolExecutor] = None
        self.quant = quant or QuantConfig(enabled=False)
        self._wire_done = {"bytes_sent": 0, "bytes_received": 0}
        pg_codec, pg_block = self.quant.for_stage("").wire_codec("pseudo_gradients")
        if diloco is not None and pg_codec != "none":
            diloco = replace(diloco, pseudo_gradient_codec=pg_codec, codec_block_size=pg_block)
        self.diloco = diloco
        self._rounds: Optional[TrainerRounds] = None
        self.diloco_reports: list[dict[str, Any]] = []
        """One entry per outer round: round, group size, bytes sent/received, outer-param checksum per stage."""

    # ------------------------------------------------------------------ Lightning plumbing
    @property
    @override
    def root_device(self) -> torch.device:
        from lightning.pytorch.accelerators import CUDAAccelerator

        if self.parallel_devices:
            return self.parallel_devices[self.local_rank]
        return torch.device("cuda", torch.cuda.current_device()) if isinstance(self.accelerator, CUDAAccelerator) \
            else torch.device("cpu")

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        if num_nodes != 1:
            raise ValueError(
                f"DistqatStrategy: num_nodes={num_nodes}; trainers on other machines join the swarm with "
                "initial_peers instead of num_nodes"
            )
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices else 1

    @property
    def is_distributed(self) -> bool:
        """Several trainer processes (``devices=N``): Lightning then gives each its own shard of the data."""
        return self.num_processes > 1

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.local_rank)
            self.cluster_environment.set_world_size(self.num_processes)
        rank_zero_only.rank = self.global_rank

    @override
    def _configure_launcher(self) -> None:
        env = self.cluster_environment
        if self.num_processes > 1 and env is not None and not env.creates_processes_externally:
            self._launcher = _SubprocessScriptLauncher(env, self.num_processes, 1)

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @override
    def reduce(self, tensor: Any, group: Optional[Any] = None, reduce_op: Optional[Any] = "mean") -> Any:
        return tensor

    @override
    def barrier(self, name: Optional[str] = None) -> None:
        pass

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    @override
    def all_gather(self, tensor: torch.Tensor, group: Optional[Any] = None, sync_grads: bool = False) -> torch.Tensor:
        return tensor

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
            _clip_across_swarm(plugin, self)
        self._precision_plugin = plugin

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="Pipeline stages on hivemind swarm experts (lightning-distqat)"
        )

    @property
    def swarm_active(self) -> bool:
        """True between setup and teardown, while stage submodules are replaced by remote proxies."""
        return bool(self._handles)

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        refuse_in_spawned_child("DistqatStrategy")
        module = self.lightning_module
        assert module is not None
        if self.stages:
            self._originals = resolve_stages(module, self.stages)
        if self.stages or self.diloco is not None:
            try:
                self._join_swarm()
                for name, handle in self._handles.items():
                    set_submodule(module, name, RemoteStage(name, handle))
            except BaseException:
                self._stop_swarm(pull_weights=False)
                raise
        super().setup(trainer)

    def _join_swarm(self) -> None:
        """Start this trainer's DHT node (rank 0 of ``devices=N`` publishes it for the other ranks, which join it),
        the embedded experts if there are stages and no ``initial_peers``, and claim a pipeline."""
        if self.world_size > 1 and not self.swarm_config.initial_peers:
            self._rendezvous = Rendezvous.for_launch(self.swarm_config.experiment)
            if self.global_rank == 0:
                self._rendezvous.cleanup()  # marks left by an earlier launch that died on the same port
            if self.global_rank > 0:
                peers = self._rendezvous.wait_peers(self.swarm_config.startup_timeout)
                self.swarm_config = replace(self.swarm_config, initial_peers=peers)
        self._client = SwarmClient(self.swarm_config).start()
        if self._rendezvous is not None and self.global_rank == 0:
            self._rendezvous.publish(self._client.visible_maddrs)
        if self.stages:
            self._start_swarm()

    def _start_swarm(self) -> None:
        cfg = self.swarm_config
        assert self._client is not None
        if not cfg.initial_peers:
            expert_cfg = ExpertConfig(experiment=cfg.experiment, host_maddrs=cfg.host_maddrs, device=cfg.expert_device)
            self._embedded = EmbeddedSwarm(
                self._originals, expert_config=expert_cfg, replicas=self.world_size, startup_timeout=cfg.startup_timeout
            )
            atexit.register(self._embedded.shutdown)
            self._embedded.start(self._client.visible_maddrs)
            if self._rendezvous is not None:
                self._rendezvous.mark("experts")
            rank_zero_info(
                f"DistqatStrategy: embedded swarm up, {len(self._originals) * self.world_size} experts serve "
                f"{list(self._originals)}" + (f" ({self.world_size} per stage)" if self.world_size > 1 else "")
            )
        elif self._rendezvous is not None:  # the other ranks of a launch use the experts that rank 0 starts
            if self._rendezvous.wait_marks(["experts"], cfg.startup_timeout):
                raise TimeoutError(f"DistqatStrategy (rank {self.global_rank}): rank 0 did not start its embedded "
                                   f"experts within startup_timeout={cfg.startup_timeout:.0f}s (see rank 0's log; "
                                   "raise SwarmConfig.startup_timeout on a slow machine)")
        fingerprints = {name: stage_fingerprint(m) for name, m in self._originals.items()}
        self._handles = self._client.claim_pipeline(fingerprints)
        for name, handle in self._handles.items():
            stage_quant = self.quant.for_stage(name)
            handle.activations = stage_quant.wire_codec("activations")
            handle.gradients = stage_quant.wire_codec("gradients")
        rank_zero_info(
            "DistqatStrategy: pipeline " + " -> ".join(f"{s} @ …{h.peer_id[-8:]}" for s, h in self._handles.items())
        )
        self._pool = ThreadPoolExecutor(max(1, len(self._handles)), thread_name_prefix="distqat-fanout")
        if cfg.initial_peers and self._rendezvous is None:  # a joined swarm's experts have their own weights
            self._each(lambda h: h.set_state({"module": self._originals[h.stage].state_dict()}))

    @override
    def setup_optimizers(self, trainer: "pl.Trainer") -> None:
        with self._originals_in_place():
            super().setup_optimizers(trainer)
        if not self.swarm_active:
            return
        self._splits = {}
        for index, optimizer in enumerate(self.optimizers):
            split = OptimizerSplit.create(optimizer, index, self._originals)
            self._splits[id(optimizer)] = split
            split.keep_local()
        specs: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in self._handles}
        for split in self._splits.values():
            for stage in split.stages:
                specs[stage][split.index] = split.expert_spec(stage)
        self._each(lambda h: h.configure(specs[h.stage], qat=self._qat_of(h.stage)))

    # ------------------------------------------------------------------ training
    @override
    def on_train_start(self) -> None:
        """Join the DiLoCo averaging groups (after any checkpoint was restored, so the outer state starts from it).

        Every expert of the pipeline joins its stage's group; the parameters that live on this trainer (the whole
        model without stages, or those outside every stage) join a group of their own.
        """
        super().on_train_start()
        if self.diloco is None or self._client is None:
            return
        assert self.lightning_module is not None
        # a swarm that this trainer started and told nobody about has no other replicas to wait for
        solo = not self.swarm_config.initial_peers and self.world_size == 1
        self._rounds = TrainerRounds(
            self.diloco, handles=dict(self._handles), dht=self._client.dht, experiment=self.swarm_config.experiment,
            local_params=[p for p in self.lightning_module.parameters() if p.requires_grad],
            solo=solo, pool=self._pool, request_timeout=self.swarm_config.request_timeout,
        )
        self.diloco_reports = self._rounds.reports
        start = self._rounds.start()
        if self._rendezvous is not None:  # line the ranks up, so that the first round finds every replica
            late = self._rendezvous.barrier("started", self.global_rank, self.world_size,
                                            self.swarm_config.startup_timeout)
            if late:
                log.warning("DistqatStrategy: ranks %s did not reach training within %.0fs; going on without "
                            "waiting for them", late, self.swarm_config.startup_timeout)
        rank_zero_info(
            f"DistqatStrategy: DiLoCo on, an outer round every {self.diloco.inner_steps} inner steps "
            f"(starting at round {start}{'; alone in this swarm' if solo else ''})"
        )

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._rounds is not None and args:
            try:
                self._rounds.samples_since_round += extract_batch_size(args[0])
            except Exception:  # noqa: BLE001 - a batch without a size counts as one sample
                self._rounds.samples_since_round += 1
        return super().training_step(*args, **kwargs)

    @override
    def optimizer_step(
        self, optimizer: Optimizer, closure: Callable[[], Any], model: Optional[Any] = None, **kwargs: Any
    ) -> Any:
        split = self._splits.get(id(optimizer))
        self._pending = {}
        result = super().optimizer_step(optimizer, closure, model, **kwargs)  # closure, clipping, local step
        if split is not None:
            groups = split.group_hparams()
            self._each(
                lambda h: h.step(split.index, groups, **self._pending),
                [self._handles[s] for s in split.stages],
            )
        self._log_wire_bytes()
        if self._rounds is not None and (split is None or split.index == 0):
            report = self._rounds.inner_step_done()
            logger = self.lightning_module.logger if self.lightning_module is not None else None
            if report is not None and logger is not None:
                metrics = {f"diloco/{k}": float(v) for k, v in report.items() if k != "checksums"}
                logger.log_metrics(metrics, step=self._rounds.inner_steps)
        return result

    def _qat_of(self, stage: str) -> Optional[dict[str, Any]]:
        q = self.quant.for_stage(stage)
        return {"scheme": q.qat, "group_size": q.qat_group_size} if q.qat else None

    def wire_bytes(self) -> dict[str, int]:
        """Tensor bytes sent to and received from the experts by forward/backward calls of the current (or last)
        fit (after encoding)."""
        if not self._handles:
            return dict(self._wire_done)
        return {"bytes_sent": sum(h.bytes_sent for h in self._handles.values()),
                "bytes_received": sum(h.bytes_received for h in self._handles.values())}

    def _log_wire_bytes(self) -> None:
        module = self.lightning_module
        trainer = module.trainer if module is not None else None
        if not self._handles or trainer is None or module.logger is None:
            return
        if (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0:
            module.logger.log_metrics({f"wire/{k}": float(v) for k, v in self.wire_bytes().items()},
                                      step=trainer.global_step)

    def clip_grad_norm(self, optimizer: Optimizer, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """``clip_grad_norm_`` over the local parameters and every stage's parameters together."""
        split = self._splits.get(id(optimizer))
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms = [torch.linalg.vector_norm(p.grad.detach(), norm_type).cpu() for p in params]
        if split is not None:
            remote = self._each(lambda h: h.grad_norm(norm_type), [self._handles[s] for s in split.stages])
            norms += [torch.tensor(n, dtype=torch.float32) for n in remote]
        if not norms:
            return torch.tensor(0.0)
        total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if params:
            torch._foreach_mul_([p.grad for p in params], scale.to(params[0].grad.device))
        self._pending["grad_scale"] = float(scale)
        return total

    def clip_grad_value(self, optimizer: Optimizer, clip_value: float) -> None:
        for p in (p for g in optimizer.param_groups for p in g["params"] if p.grad is not None):
            p.grad.clamp_(-clip_value, clip_value)
        self._pending["clip_value"] = float(clip_value)

    # ------------------------------------------------------------------ checkpoints
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = super().lightning_module_state_dict()
        if self.swarm_active:
            for stage, stage_state in self._pull_states().items():
                state.update({f"{stage}.{k}": v for k, v in stage_state["module"].items()})
        return state

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if not self.swarm_active:
            return super().load_model_state_dict(checkpoint, strict)
        full = checkpoint["state_dict"]
        parts: dict[str, dict[str, Any]] = {name: {} for name in self._handles}
        local = {}
        for key, value in full.items():
            stage = next((s for s in parts if key.startswith(s + ".")), None)
            if stage is None:
                local[key] = value
            else:
                parts[stage][key[len(stage) + 1 :]] = value
        assert self.lightning_module is not None
        self.lightning_module.load_state_dict(local, strict=strict)
        self._each(lambda h: h.set_state({"module": parts[h.stage]}))

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        split = self._splits.get(id(optimizer))
        if split is None or not self.swarm_active:
            return super().optimizer_state(optimizer)
        states = self._pull_states()
        return split.merge_state({s: st["optimizers"].get(split.index, {}) for s, st in states.items()})

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        if not self.swarm_active:
            return super().load_optimizer_state_dict(checkpoint)
        expert_parts: dict[str, dict[int, Any]] = {name: {} for name in self._handles}
        for optimizer, saved in zip(self.optimizers, checkpoint["optimizer_states"]):
            split = self._splits[id(optimizer)]
            local, per_stage = split.split_state(saved)
            optimizer.load_state_dict(local)
            for stage, part in per_stage.items():
                expert_parts[stage][split.index] = part
        self._each(lambda h: h.set_state({"optimizers": expert_parts[h.stage]}))

    # ------------------------------------------------------------------ teardown
    @override
    def teardown(self) -> None:
        self._stop_swarm(pull_weights=True)
        super().teardown()

    def _stop_swarm(self, *, pull_weights: bool) -> None:
        """Bring trained weights home, put the original submodules back, then stop the swarm (reverse of start)."""
        module = self.lightning_module
        try:
            if self._rounds is not None:
                self._rounds.finish(keep_outer=pull_weights)  # the module ends holding the outer params
            if pull_weights and self.swarm_active:
                self._bring_home()
        finally:
            if self._rounds is not None:
                self._rounds.finish(keep_outer=False)  # idempotent: stops averaging if the above failed
                self._rounds = None
            if module is not None:
                for name, original in self._originals.items():
                    set_submodule(module, name, original)
            for split in self._splits.values():
                split.restore()
            self._wire_done = self.wire_bytes()
            self._splits, self._handles = {}, {}
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            if self._client is not None:
                self._client.release_all()
            self._leave_rendezvous()
            if self._embedded is not None:
                self._embedded.shutdown()
                atexit.unregister(self._embedded.shutdown)
                self._embedded = None
            if self._client is not None:
                self._client.shutdown()
                self._client = None

    def _leave_rendezvous(self) -> None:
        """Other ranks say they are done; rank 0 waits for them before it stops the experts they use."""
        if self._rendezvous is None:
            return
        if self.global_rank > 0:
            self._rendezvous.mark_done(self.global_rank)
        else:
            timeout = self.swarm_config.startup_timeout + self.swarm_config.request_timeout
            late = self._rendezvous.wait_done(range(1, self.world_size), timeout)
            if late:
                log.warning("DistqatStrategy: ranks %s did not finish within %.0fs; stopping the swarm", late, timeout)
            self._rendezvous.cleanup()
        self._rendezvous = None

    def _bring_home(self) -> None:
        """Load every stage's trained weights and optimizer state from its expert into the user's objects.

        A stage whose expert cannot answer keeps the weights it had when training started; the error says which.
        """

        def pull(handle: ExpertHandle) -> Any:
            try:
                return handle.get_state()
            except ExpertError as e:
                return e

        handles = list(self._handles.values())
        pulled = dict(zip([h.stage for h in handles], self._each(pull, handles)))
        failed = {stage: e for stage, e in pulled.items() if isinstance(e, ExpertError)}
        for stage, error in failed.items():
            log.error(
                "DistqatStrategy: could not bring the trained weights of stage '%s' home (%s); the module keeps the "
                "weights this stage had when training started", stage, error,
            )
        states = {stage: st for stage, st in pulled.items() if stage not in failed}
        for name, state in states.items():
            device = next(self._originals[name].parameters(), torch.empty(0)).device
            self._originals[name].load_state_dict({k: v.to(device) for k, v in state["module"].items()})
        for split in self._splits.values():
            merged = split.merge_state({s: st["optimizers"].get(split.index, {}) for s, st in states.items()})
            split.restore()
            split.optimizer.load_state_dict(merged)

    # ------------------------------------------------------------------ helpers
    def _pull_states(self) -> dict[str, dict[str, Any]]:
        handles = list(self._handles.values())
        return dict(zip([h.stage for h in handles], self._each(lambda h: h.get_state(), handles)))

    def _each(self, fn: Callable[[ExpertHandle], Any], handles: Optional[Sequence[ExpertHandle]] = None) -> list[Any]:
        """Call ``fn`` on every (given) expert handle concurrently; re-raise the first error."""
        handles = list(self._handles.values()) if handles is None else list(handles)
        if self._pool is None or len(handles) <= 1:
            return [fn(h) for h in handles]
        return list(self._pool.map(fn, handles))

    @contextmanager
    def _originals_in_place(self) -> Iterator[None]:
        module = self.lightning_module
        if not self.swarm_active or module is None:
            yield
            return
        proxies = {name: module.get_submodule(name) for name in self._originals}
        for name, original in self._originals.items():
            set_submodule(module, name, original)
        try:
            yield
        finally:
            for name, proxy in proxies.items():
                set_submodule(module, name, proxy)


_CLIP_CLASSES: dict[type, type] = {}


def _clip_across_swarm(plugin: Precision, strategy: DistqatStrategy) -> None:
    """Make ``plugin`` clip gradients over local and remote parameters together (mixing in two overrides, so every
    other behaviour of the user's precision plugin is kept)."""
    base = type(plugin)
    if getattr(base, "_distqat_clipping", False):
        plugin._distqat_strategy = strategy  # type: ignore[attr-defined]
        return
    if base not in _CLIP_CLASSES:

        def clip_grad_by_norm(self: Precision, optimizer: Optimizer, clip_val: Union[int, float]) -> None:
            self._distqat_strategy.clip_grad_norm(optimizer, float(clip_val))

        def clip_grad_by_value(self: Precision, optimizer: Optimizer, clip_val: Union[int, float]) -> None:
            self._distqat_strategy.clip_grad_value(optimizer, float(clip_val))

        _CLIP_CLASSES[base] = type(
            f"Distqat{base.__name__}",
            (base,),
            {"clip_grad_by_norm": clip_grad_by_norm, "clip_grad_by_value": clip_grad_by_value,
             "_distqat_clipping": True},
        )
    plugin.__class__ = _CLIP_CLASSES[base]
    plugin._distqat_strategy = strategy  # type: ignore[attr-defined]
