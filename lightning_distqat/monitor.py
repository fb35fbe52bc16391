"""The fleet monitor (``distqat-monitor``): the bootstrap DHT node of an experiment, ``initial_peers.txt`` for every
other role, and the fleet's numbers (from expert records and trainer telemetry in the DHT) to Weights & Biases and a
console table."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any, Optional, Sequence, TextIO

from lightning_distqat.config import MonitorConfig
from lightning_distqat.swarm.records import (ExpertRecord, TrainerTelemetry, experts_key, read_directory,
                                             read_telemetry)

__all__ = ["Monitor", "fleet_metrics", "format_table", "wandb_mode"]

log = logging.getLogger(__name__)


def fleet_metrics(records: Sequence[ExpertRecord], telemetry: Sequence[TrainerTelemetry],
                  stages: Sequence[str] = ()) -> dict[str, float]:
    """The fleet's numbers from what the DHT holds now: experts alive, free and leased per stage, complete and free
    pipelines, each trainer's loss and samples/s, their totals, the DiLoCo round, group sizes and wire bytes."""
    stages = list(stages) or sorted({r.stage for r in records})
    metrics: dict[str, float] = {}
    for stage in stages:
        here = [r for r in records if r.stage == stage]
        metrics[f"experts/{stage}/alive"] = len(here)
        metrics[f"experts/{stage}/leased"] = sum(r.leased for r in here)
    alive = [metrics[f"experts/{s}/alive"] for s in stages]
    free = [metrics[f"experts/{s}/alive"] - metrics[f"experts/{s}/leased"] for s in stages]
    metrics["fleet/experts_alive"] = len(records)
    metrics["fleet/experts_leased"] = sum(r.leased for r in records)
    metrics["fleet/pipelines"] = min(alive) if alive else 0
    metrics["fleet/free_pipelines"] = min(free) if free else 0
    metrics["fleet/expert_round"] = max((r.version for r in records), default=0)
    losses = []
    for t in telemetry:
        metrics[f"trainer/{t.trainer}/loss"] = t.loss
        metrics[f"trainer/{t.trainer}/samples_per_s"] = t.samples_per_s
        metrics[f"trainer/{t.trainer}/step"] = t.step
        if math.isfinite(t.loss):
            losses.append(t.loss)
    metrics["fleet/trainers"] = len(telemetry)
    metrics["fleet/samples_per_s"] = sum(t.samples_per_s for t in telemetry)
    metrics["fleet/samples"] = sum(t.samples for t in telemetry)
    if losses:
        metrics["fleet/loss"] = sum(losses) / len(losses)
    metrics["fleet/round"] = max((t.round for t in telemetry), default=0)
    sizes = [t.group_size for t in telemetry if t.group_size > 0]
    if sizes:
        metrics["fleet/group_size_min"] = min(sizes)
        metrics["fleet/group_size_max"] = max(sizes)
    metrics["fleet/wire_bytes"] = sum(t.wire_bytes for t in telemetry)
    return metrics


def format_table(metrics: dict[str, float], telemetry: Sequence[TrainerTelemetry], stages: Sequence[str],
                 experiment: str) -> list[str]:
    """The console report: one line for the fleet, one per stage, one per trainer."""
    loss = metrics.get("fleet/loss")
    lines = [f"{experiment}: {int(metrics['fleet/pipelines'])} complete pipeline(s), "
             f"{int(metrics['fleet/free_pipelines'])} free; {int(metrics['fleet/trainers'])} trainer(s), "
             f"{metrics['fleet/samples_per_s']:.1f} samples/s, loss {'n/a' if loss is None else f'{loss:.4f}'}, "
             f"round {int(metrics['fleet/round'])}, wire {metrics['fleet/wire_bytes'] / 2**20:.1f} MiB"]
    for stage in list(stages) or sorted({k.split('/')[1] for k in metrics if k.startswith('experts/')}):
        lines.append(f"  stage {stage:<24} {int(metrics.get(f'experts/{stage}/alive', 0))} alive, "
                     f"{int(metrics.get(f'experts/{stage}/leased', 0))} leased")
    for t in sorted(telemetry, key=lambda t: t.trainer):
        lines.append(f"  {t.trainer[:24]:<30} step {t.step:>6}  loss {t.loss:8.4f}  {t.samples_per_s:7.1f} samples/s  "
                     f"round {t.round} (group {t.group_size})")
    return lines


def wandb_mode(requested: Optional[str]) -> str:
    """``requested``, else ``online`` when an API key is configured (``WANDB_API_KEY`` or ``wandb login``), else
    ``offline``."""
    if requested is not None:
        return requested
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        with open(netrc) as f:
            return "online" if "api.wandb.ai" in f.read() else "offline"
    except OSError:
        return "offline"


class Monitor:
    """Start the DHT node (or join one), write the peers file, then ``report()`` every ``period`` seconds."""

    def __init__(self, config: MonitorConfig, out: TextIO = sys.stdout) -> None:
        self.config = config
        self.out = out
        self.dht: Any = None
        self.run: Any = None
        self.peers_file = config.peers_file or os.path.join("logs", config.experiment, "initial_peers.txt")
        self.reports = 0
        self._drawn = 0

    def start(self) -> "Monitor":
        from lightning_distqat.swarm.dht import public_maddrs, start_dht

        cfg = self.config
        host, announce = public_maddrs(cfg.public_ip, cfg.port)
        self.dht = start_dht(cfg.initial_peers or None, host_maddrs=host, experiment=cfg.experiment,
                             access_token=cfg.access_token, **({"announce_maddrs": announce} if announce else {}))
        try:
            maddrs = [str(m) for m in self.dht.get_visible_maddrs()]
            os.makedirs(os.path.dirname(os.path.abspath(self.peers_file)), exist_ok=True)
            tmp = f"{self.peers_file}.tmp"
            with open(tmp, "w") as f:
                f.write("".join(f"{m}\n" for m in maddrs))
            os.replace(tmp, self.peers_file)
            if cfg.wandb:
                self._start_wandb()
        except BaseException:
            self.shutdown()
            raise
        return self

    def _start_wandb(self) -> None:
        cfg = self.config
        mode = wandb_mode(cfg.wandb_mode)
        if mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        directory = cfg.wandb_dir or os.path.join("logs", cfg.experiment)
        os.makedirs(directory, exist_ok=True)
        self.run = wandb.init(project=cfg.wandb_project, group=cfg.wandb_group or cfg.experiment,
                              name=f"{cfg.experiment}-monitor", job_type="monitor", dir=directory, mode=mode,
                              config={"experiment": cfg.experiment, "stages": list(cfg.stages)})
        log.info("distqat-monitor: W&B run %s (%s) in %s", self.run.id, mode, self.run.dir)

    def fleet(self) -> tuple[list[ExpertRecord], list[TrainerTelemetry]]:
        records = read_directory(self.dht, experts_key(self.config.experiment), ExpertRecord.from_dict)
        telemetry = read_telemetry(self.dht, self.config.experiment)
        return records, telemetry

    def report(self) -> dict[str, float]:
        """Read the fleet once, log it to W&B and the console; returns the metrics."""
        records, telemetry = self.fleet()
        metrics = fleet_metrics(records, telemetry, self.config.stages)
        if self.run is not None:
            self.run.log(metrics, step=self.reports)
        if self.config.console:
            self._draw(format_table(metrics, telemetry, self.config.stages, self.config.experiment))
        self.reports += 1
        return metrics

    def _draw(self, lines: list[str]) -> None:
        if self.out.isatty() and self._drawn:
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")  # back to the table's first line, clear below
        self.out.write("".join(f"{line}\n" for line in lines))
        self.out.flush()
        self._drawn = len(lines)

    def serve(self, stopping: Any) -> None:
        """Report every ``period`` seconds until ``stopping`` (an Event) is set or ``duration`` passes."""
        end = time.monotonic() + self.config.duration if self.config.duration > 0 else math.inf
        while True:
            try:
                self.report()
            except Exception:  # noqa: BLE001 - one failed read must not stop the monitor
                log.warning("distqat-monitor: reading the fleet failed", exc_info=True)
            wait = min(self.config.period, end - time.monotonic())
            if wait <= 0 or stopping.wait(wait):
                return

    def shutdown(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None
