"""Lightning callbacks for swarm training: the swarm's metrics for the logger, a model summary that counts the remote
stages, and a closing summary of a fit."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Mapping, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import ModelSummary as _LightningSummary
from typing_extensions import override

__all__ = ["SwarmMetrics", "SwarmModelSummary", "TrainingSummary", "DiLoCoInnerSteps", "FleetTelemetry"]


class SwarmMetrics(Callback):
    """Sends the swarm's series to the Trainer's loggers: ``wire/bytes_sent`` and ``wire/bytes_received`` (tensor
    bytes of the stage calls so far, after encoding) every ``log_every_n_steps`` steps, and ``diloco/round``,
    ``diloco/group_size``, ``diloco/bytes_sent``, ``diloco/bytes_received``, ``diloco/inner_seconds`` (the inner phase
    before the round) and ``diloco/batch_size`` (samples per inner step) after every outer round.

    :class:`~lightning_distqat.DistqatStrategy` adds one to its Trainer unless the user passed their own.
    """

    def __init__(self) -> None:
        self._rounds_logged = 0

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._rounds_logged = 0

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        strategy = trainer.strategy
        step = trainer.global_step
        if getattr(strategy, "swarm_active", False) and step % max(1, trainer.log_every_n_steps) == 0:
            self._log(trainer, {f"wire/{k}": float(v) for k, v in strategy.wire_bytes().items()}, step)
        self._log_rounds(trainer)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._log_rounds(trainer)

    def _log_rounds(self, trainer: "pl.Trainer") -> None:
        reports = getattr(trainer.strategy, "diloco_reports", [])
        for report in reports[self._rounds_logged:]:
            metrics = {f"diloco/{k}": float(v) for k, v in report.items() if isinstance(v, (int, float))}
            self._log(trainer, metrics, report["inner_step"])
        self._rounds_logged = len(reports)

    @staticmethod
    def _log(trainer: "pl.Trainer", metrics: dict[str, float], step: int) -> None:
        for logger in trainer.loggers:  # as LearningRateMonitor does; loggers write on rank 0 only
            logger.log_metrics(metrics, step=step)


class FleetTelemetry(Callback):
    """Publishes this trainer's numbers (:class:`~lightning_distqat.swarm.records.TrainerTelemetry`: loss, samples/s,
    DiLoCo round and group size, wire bytes, its experts) to the DHT under ``<experiment>_metrics`` every
    ``telemetry_period`` seconds, signed under its own subkey; ``distqat-monitor`` reads them.
    :class:`~lightning_distqat.DistqatStrategy` adds one when the trainer is in a swarm."""

    def __init__(self, dht: Any, experiment: str, name: str, period: float) -> None:
        self._dht, self._experiment, self._name, self._period = dht, experiment, name, period
        self._step = self._samples = 0
        self._loss = float("nan")
        self._last: Optional[tuple[float, int]] = None

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._step = self._samples = 0
        self._last = (time.monotonic(), 0)

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._step += 1
        self._samples += _batch_size(batch)
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is not None and hasattr(loss, "detach"):
            self._loss = float(loss.detach())
        if self._last is None or time.monotonic() - self._last[0] >= self._period:
            self.publish(trainer)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.publish(trainer)

    def publish(self, trainer: "pl.Trainer") -> None:
        from hivemind.utils.timed_storage import get_dht_time

        from lightning_distqat.swarm.records import local_owner_key, metrics_key

        now = time.monotonic()
        since, samples_then = self._last or (now, 0)
        self._last = (now, self._samples)
        strategy = trainer.strategy
        reports = getattr(strategy, "diloco_reports", None) or [{}]
        wire = strategy.wire_bytes() if hasattr(strategy, "wire_bytes") else {}
        experts = strategy.current_experts() if hasattr(strategy, "current_experts") else {}
        value = {
            "trainer": self._name[:128], "step": self._step, "loss": self._loss if abs(self._loss) != float("inf")
            else float("nan"), "samples_per_s": (self._samples - samples_then) / (now - since) if now > since else 0.0,
            "samples": self._samples, "round": int(reports[-1].get("round", 0)),
            "group_size": int(reports[-1].get("group_size", 0)), "wire_bytes": int(sum(wire.values())),
            "experts": [e["peer_id"] for e in experts.values()][:64],
        }
        try:
            self._dht.store(metrics_key(self._experiment), subkey=local_owner_key(), value=value,
                            expiration_time=get_dht_time() + max(30.0, 5 * self._period), return_future=True)
        except Exception:  # noqa: BLE001 - telemetry must never stop training
            pass


class _Row:
    """A row of the model summary for a module that holds remote stages (or is one)."""

    def __init__(self, layer: Any, layer_type: str, params: int) -> None:
        self._layer, self.layer_type, self.num_parameters = layer, layer_type, params

    def __getattr__(self, name: str) -> Any:  # in_size, out_size, training, detach_hook
        return getattr(self._layer, name)


class _StageRow:
    """A model-summary row for a remote stage that the chosen depth would not show."""

    in_size = out_size = "?"

    def __init__(self, layer_type: str, params: int, training: bool) -> None:
        self.layer_type, self.num_parameters, self.training = layer_type, params, training

    def detach_hook(self) -> None:
        pass


class SwarmModelSummary(_LightningSummary):
    """Lightning's model summary, counting the parameters of the remote stages (which live on experts, not in the
    proxies that stand in for them): every row holding stages counts theirs, every stage gets a row of its own typed
    ``<Module> (remote)``, and the totals include them.

    Args:
        remote: per stage path, ``(type name of its module, parameters, trainable parameters)``.
    """

    def __init__(self, model: "pl.LightningModule", max_depth: int = 1, *,
                 remote: Mapping[str, tuple[str, int, int]]) -> None:
        self._remote = dict(remote)
        super().__init__(model, max_depth)

    @override
    def summarize(self) -> dict[str, Any]:
        rows: "OrderedDict[str, Any]" = OrderedDict()
        for name, layer in super().summarize().items():
            inside = [s for s in self._remote if s == name or s.startswith(name + ".")]
            if inside:
                kind = f"{self._remote[name][0]} (remote)" if name in self._remote else layer.layer_type
                layer = _Row(layer, kind, layer.num_parameters + sum(self._remote[s][1] for s in inside))
            rows[name] = layer
            if self._max_depth != 0:
                for stage in inside:
                    if stage not in rows:
                        kind, params, _ = self._remote[stage]
                        rows[stage] = _StageRow(f"{kind} (remote)", params, self._model.training)
        return rows

    @property
    @override
    def total_parameters(self) -> int:
        return super().total_parameters + sum(params for _, params, _ in self._remote.values())

    @property
    @override
    def trainable_parameters(self) -> int:
        return super().trainable_parameters + sum(trainable for _, _, trainable in self._remote.values())


class CountRemoteStages:
    """Mixed into the Trainer's ``ModelSummary`` callback (``RichModelSummary`` too) by the strategy, so the summary
    printed at the start of ``fit`` shows the remote stages' real parameter counts."""

    _max_depth: int

    def _summary(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Any:
        pipeline = getattr(trainer.strategy, "pipeline", None)
        if pipeline is None:
            return super()._summary(trainer, pl_module)  # type: ignore[misc]
        totals, trainable = pipeline.param_counts(), pipeline.param_counts(trainable=True)
        remote = {s: (type(m).__name__, totals[s], trainable[s]) for s, m in pipeline.originals.items()}
        return SwarmModelSummary(pl_module, max_depth=self._max_depth, remote=remote)


class DiLoCoInnerSteps(Callback):
    """Ends a DiLoCo inner step at the end of every training batch whose optimizers stepped: a batch counts once
    however many optimizers it steps, and the round's result is in place before other callbacks (checkpoints) see
    the batch end. The strategy puts it first among the Trainer's callbacks."""

    def __init__(self, end_of_batch: Any) -> None:
        self._end_of_batch = end_of_batch

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._end_of_batch()


class DiLoCoCheckpointState(Callback):
    """Keeps the DiLoCo outer state (every stage's outer params, outer optimizer state and round, the trainer's own,
    the inner-step count) in Lightning checkpoints, under this callback's state, and hands it back on restore so
    that a resumed run continues its outer optimizer. The strategy adds it once; it stays after ``fit`` so that a
    checkpoint saved then holds the final outer state."""

    def __init__(self, strategy: Any) -> None:
        self._strategy = strategy

    @property
    def state_key(self) -> str:
        return "DistqatDiLoCo"

    @override
    def state_dict(self) -> dict[str, Any]:
        state = self._strategy.diloco_state()
        return {"diloco": state} if state is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._strategy.restore_diloco_state(state_dict.get("diloco"))


class TrainingSummary(Callback):
    """Prints a closing summary of a fit: steps, samples, samples/s, first and final training loss, where logs went.

    The numbers are kept in :attr:`summary` for scripts and tests.
    """

    def __init__(self, loss_key: str = "train_loss") -> None:
        self.loss_key = loss_key
        self.summary: dict[str, Any] = {}
        self._start: Optional[float] = None
        self._samples = 0
        self._first_loss: Optional[float] = None

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._start, self._samples, self._first_loss = time.perf_counter(), 0, None

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._samples += _batch_size(batch)
        if self._first_loss is None and self.loss_key in trainer.callback_metrics:
            self._first_loss = float(trainer.callback_metrics[self.loss_key])

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        seconds = time.perf_counter() - (self._start or time.perf_counter())
        final = trainer.callback_metrics.get(self.loss_key)
        self.summary = {
            "steps": trainer.global_step,
            "samples": self._samples,
            "seconds": seconds,
            "samples_per_second": self._samples / seconds if seconds > 0 else 0.0,
            "first_loss": self._first_loss,
            "final_loss": float(final) if final is not None else None,
            "log_dir": trainer.log_dir,
        }
        s = self.summary
        loss = f"{s['first_loss']:.4f} -> {s['final_loss']:.4f}" if s["final_loss"] is not None and s["first_loss"] \
            is not None else "n/a"
        rank_zero_info(
            f"\nSummary: {s['steps']} steps, {s['samples']} samples in {seconds:.1f}s "
            f"({s['samples_per_second']:.1f} samples/s); {self.loss_key} {loss}; logs in {s['log_dir']}"
        )


def _batch_size(batch: Any) -> int:
    """Rows in a batch: the length of its first tensor (tuples, lists and dicts of tensors alike)."""
    while isinstance(batch, (list, tuple, dict)) and len(batch):
        batch = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return len(batch) if hasattr(batch, "__len__") else 1
