"""``distqat-chaos`` (``python -m lightning_distqat.chaos``): the failover drill. Trains a small model through an
embedded swarm with spare experts while it kills (SIGKILL) or stops (SIGTERM) the expert that the pipeline uses, on
a schedule, and prints what each failure cost: the steps of that stage lost, the time until training went on, and
the throughput before the first failure and after the last one.

The model is :class:`~lightning_distqat.models.MLPClassifier` on synthetic data (a fixed random teacher), all on this
machine (no download)::

    distqat-chaos --steps 60 --every 15 --signals kill,term --spares 2 --mirror-every 5
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

__all__ = ["Chaos", "run", "main"]

SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM}


def _lightning():  # noqa: ANN202 - imported late: --help stays fast
    import lightning.pytorch as pl

    return pl


def _loader(steps: int, batch_size: int, seed: int = 0) -> Any:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(32, 8, generator=g)
    x = torch.randn(steps * batch_size, 32, generator=g)
    return DataLoader(TensorDataset(x, (x @ teacher).argmax(-1)), batch_size=batch_size, shuffle=False)


@dataclass
class Failure:
    step: int
    stage: str
    signal: str
    pid: int
    peer_id: str
    at: float


@dataclass
class Chaos:
    """A Lightning callback that fails the pipeline's experts on a schedule: at each step of ``at_steps`` it sends
    the next signal of ``signals`` to the expert that serves the next stage (round robin), and records per-batch
    times for throughput."""

    at_steps: Sequence[int]
    signals: Sequence[str] = ("kill", "term")
    failures: list[Failure] = field(default_factory=list)
    batch_ends: list[tuple[int, float, int]] = field(default_factory=list)
    """(global step after the batch, time, samples) per training batch."""
    failovers: list[dict[str, Any]] = field(default_factory=list)
    cold_start: Optional[float] = None
    """Seconds the slowest embedded expert took from launch to serving (what a replacement started anew costs)."""

    def __post_init__(self) -> None:
        from lightning.pytorch.callbacks import Callback

        chaos = self

        class _Hook(Callback):
            def on_train_start(self, trainer, pl_module):  # noqa: ANN001
                embedded = trainer.strategy.membership.embedded if trainer.strategy.membership else None
                chaos.cold_start = sum(embedded.startup_split().values()) if embedded is not None else None

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
                chaos._maybe_fail(trainer)

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
                chaos.batch_ends.append((trainer.global_step, time.time(), len(batch[0])))

            def on_train_end(self, trainer, pl_module):  # noqa: ANN001
                pipeline = trainer.strategy.pipeline
                chaos.failovers = list(pipeline.failovers) if pipeline is not None else []

        self.callback = _Hook()

    def _maybe_fail(self, trainer: Any) -> None:
        step = trainer.global_step
        if step not in self.at_steps or any(f.step == step for f in self.failures):
            return
        experts = trainer.strategy.current_experts()
        stages = list(experts)
        n = len(self.failures)
        stage = stages[n % len(stages)]
        name = self.signals[n % len(self.signals)]
        target = experts[stage]
        if target["pid"] is None:
            return
        trainer.strategy.pipeline.wait_for_snapshot()  # what a running mirror would have by now
        os.kill(target["pid"], SIGNALS[name])
        self.failures.append(Failure(step, stage, name, target["pid"], target["peer_id"], time.time()))
        print(f"distqat-chaos: step {step}: {name.upper()} the expert of '{stage}' (pid {target['pid']}, "
              f"…{target['peer_id'][-8:]})", flush=True)

    def report(self) -> dict[str, Any]:
        """Per failure: the stage's steps lost and seconds until training went on; throughput (samples/s) before
        the first failure and after the last recovery."""
        rows = []
        for failure, failover in zip(self.failures, self.failovers):
            next_step = next((t for _, t, _ in self.batch_ends if t > failure.at), None)
            rows.append({"step": failure.step, "stage": failure.stage, "signal": failure.signal,
                         "steps_lost": failover["steps_lost"], "recovery_s": failover["done_at"] - failure.at,
                         "to_next_step_s": next_step - failure.at if next_step is not None else None,
                         "source": failover["source"]})
        first = self.failures[0].at if self.failures else float("inf")
        last = self.failovers[-1]["done_at"] if self.failovers else float("-inf")
        return {"failures": rows, "unrecovered": len(self.failures) - len(self.failovers), "cold_start_s": self.cold_start,
                "batch_ends": list(self.batch_ends),
                "before": _throughput([b for b in self.batch_ends if b[1] < first]),
                "after": _throughput([b for b in self.batch_ends if b[1] > last])}


def _throughput(batches: list[tuple[int, float, int]]) -> Optional[float]:
    if len(batches) < 3:
        return None
    batches = batches[1:]  # the first batch in a window pays for what came before
    elapsed = batches[-1][1] - batches[0][1]
    return sum(b[2] for b in batches[1:]) / elapsed if elapsed > 0 else None


def run(steps: int = 60, every: int = 15, signals: Sequence[str] = ("kill", "term"), spares: int = 2,
        mirror_every: int = 5, stages: int = 3, width: int = 64, batch_size: int = 32,
        failover_timeout: float = 60.0, progress: bool = True, request_timeout: float = 30.0) -> dict[str, Any]:
    """Run the drill; returns :meth:`Chaos.report` plus the steps trained and the final loss."""
    from lightning_distqat import DistqatStrategy, SwarmConfig

    pl = _lightning()
    for name in signals:
        if name not in SIGNALS:
            raise ValueError(f"distqat-chaos: unknown signal {name!r}; use {', '.join(SIGNALS)}")
    at_steps = list(range(every, steps - every // 2, every)) if every > 0 else []  # room after the last one
    per_stage = -(-len(at_steps) // stages)  # failures hit the stages in turn; each one uses up a spare
    if per_stage > spares:
        raise ValueError(f"distqat-chaos: {len(at_steps)} failures over {stages} stages need {per_stage} spare "
                         f"expert(s) per stage; use --spares {per_stage} or a larger --every")
    chaos = Chaos(at_steps, signals)
    from lightning_distqat.models import MLPClassifier

    pl.seed_everything(0, verbose=False)
    model = MLPClassifier(in_features=32, width=width, depth=stages, num_classes=8)
    names = model.STAGES
    strategy = DistqatStrategy(stages=names, spare_experts=spares, mirror_every=mirror_every,
                               swarm=SwarmConfig(failover_timeout=failover_timeout,
                                                 request_timeout=request_timeout))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, strategy=strategy, logger=False,
                         enable_checkpointing=False,
                         enable_progress_bar=progress, enable_model_summary=False, callbacks=[chaos.callback])
    trainer.fit(model, _loader(steps, batch_size))
    report = chaos.report()
    loss = trainer.callback_metrics.get("train_loss")
    report.update(steps=trainer.global_step, final_loss=float(loss) if loss is not None else None)
    return report


def format_report(report: dict[str, Any]) -> str:
    loss = report.get("final_loss")
    lines = ["", "distqat-chaos report",
             f"  steps trained: {report['steps']}" + (f", final loss {loss:.4f}" if loss is not None else "")]
    lines.append(f"  {'step':>5}  {'stage':<10} {'signal':<6} {'steps lost':>10} {'recovery':>9} {'next step':>10}"
                 "  state from")
    for row in report["failures"]:
        following = f"{row['to_next_step_s']:.1f}s" if row["to_next_step_s"] is not None else "n/a"
        lines.append(f"  {row['step']:>5}  {row['stage']:<10} {row['signal']:<6} {row['steps_lost']:>10} "
                     f"{row['recovery_s']:>8.1f}s {following:>10}  {row['source']}")
    if report.get("cold_start_s"):
        lines.append(f"  an embedded expert's cold start (launch to serving): {report['cold_start_s']:.1f}s")
    if report["unrecovered"]:
        lines.append(f"  {report['unrecovered']} failure(s) had not been noticed when training ended")

    def rate(v: Optional[float]) -> str:
        return f"{v:.0f} samples/s" if v is not None else "n/a"

    lines.append(f"  throughput before the first failure: {rate(report['before'])}; after the last recovery: "
                 f"{rate(report['after'])}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="distqat-chaos",
        description="Failover drill: train through an embedded swarm with spare experts while killing (SIGKILL) or "
                    "stopping (SIGTERM) the pipeline's experts on a schedule; prints steps lost per failure, time "
                    "to recover, and throughput before and after.")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps to train (default 60)")
    parser.add_argument("--every", type=int, default=15,
                        help="fail an expert every this many steps, none in the last half interval (default 15)")
    parser.add_argument("--signals", default="kill,term",
                        help="signals to send in turn: kill (SIGKILL), term (SIGTERM, a graceful leave)")
    parser.add_argument("--spares", type=int, default=2, help="spare experts per stage (default 2)")
    parser.add_argument("--mirror-every", type=int, default=5, help="steps between state snapshots (default 5)")
    parser.add_argument("--stages", type=int, default=3, help="pipeline stages: MLP blocks (default 3)")
    parser.add_argument("--width", type=int, default=64, help="hidden width of the model (default 64)")
    parser.add_argument("--request-timeout", type=float, default=30.0,
                        help="seconds a call to an expert may take (default 30); with sessions a killed expert's "
                             "call in flight is given up only then")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    report = run(steps=args.steps, every=args.every, signals=[s.strip() for s in args.signals.split(",") if s],
                 spares=args.spares, mirror_every=args.mirror_every, stages=args.stages, width=args.width,
                 progress=not args.no_progress, request_timeout=args.request_timeout)
    print(format_report(report), flush=True)
    return 0 if report["steps"] == args.steps and not report["unrecovered"] else 1


if __name__ == "__main__":
    sys.exit(main())
