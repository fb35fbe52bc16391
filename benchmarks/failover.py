"""Failover: what a failed expert costs a running fit, on one machine (2 cores, loopback, ``OMP_NUM_THREADS=1`` in
every process).

A. The chaos drill (``lightning_distqat.chaos``): a 3-stage MLP through an embedded swarm with 2 spare experts per
   stage, SIGKILL, SIGTERM, SIGKILL on the stages in turn. Per failure: steps of that stage lost (goal <= 2), seconds
   from the failure to the next completed training step divided by an embedded expert's cold start measured in the
   same run (goal <= 1.0: a spare must be faster than starting anew); throughput after the last recovery divided by
   throughput before the first failure (goal >= 0.95).
B. An auto-assigned expert: two ``distqat-expert expert.stage=auto`` processes serve a 2-stage MLP to a trainer; the
   expert of one stage is killed (no spare) and a third ``distqat-expert expert.stage=auto`` is started: seconds
   until it serves (its start-up and DHT join), until the trainer loaded the stage's state into it, and until the
   next training step.

    .venv/bin/python benchmarks/failover.py [--steps 160]
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported; every process started from here inherits it

import argparse  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def drill(steps: int) -> None:
    from lightning_distqat.chaos import format_report, run

    every = steps // 4  # failures at 1/4, 2/4, 3/4: a quarter of the run after the last one
    report = run(steps=steps, every=every, signals=("kill", "term"), spares=2, mirror_every=2, width=256,
                 progress=False)
    print(format_report(report))
    cold = report["cold_start_s"]
    print("\nA. failover with spares (goals: steps lost <= 2, next step / cold start <= 1.0, after / before >= 0.95)")
    print(f"  {'failure':<22} {'steps lost':>10} {'to next step':>13} {'/ cold start':>13}")
    for row in report["failures"]:
        ratio = row["to_next_step_s"] / cold if row["to_next_step_s"] is not None and cold else float("nan")
        print(f"  {row['signal'] + ' ' + row['stage'] + ' @' + str(row['step']):<22} {row['steps_lost']:>10} "
              f"{row['to_next_step_s']:>12.2f}s {ratio:>13.2f}")
    if report["before"] and report["after"]:
        print(f"  throughput: {report['before']:.0f} samples/s before, {report['after']:.0f} after: "
              f"ratio {report['after'] / report['before']:.2f}")


def _expert(folder: Path, name: str, peer: str) -> tuple[subprocess.Popen, Path, float]:
    started = time.time()
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("distqat-expert")), "model=mlp_tiny", "expert.experiment=failover-bench",
         "expert.stage=auto", f"expert.initial_peers=[{peer}]", f"hydra.run.dir={folder}/{name}"],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return process, folder / name / "expert.log", started


def _ready(log: Path, timeout: float = 120) -> tuple[str, float]:
    """The expert's peer id and when its log says it serves (its own clock, as epoch seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        match = re.search(r"\[(\S+ \S+)\]\[[^]]+\]\[INFO\] - expert ready: .* as peer (\S+) on", text)
        if match:
            stamp = time.mktime(time.strptime(match.group(1).split(",")[0], "%Y-%m-%d %H:%M:%S"))
            return match.group(2), stamp + int(match.group(1).split(",")[1]) / 1000
        time.sleep(0.1)
    raise RuntimeError(f"no expert started (see {log})")


def auto_assigned(steps: int) -> None:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_distqat import DistqatStrategy, SwarmConfig
    from lightning_distqat.models import MLPClassifier
    from lightning_distqat.swarm.dht import start_dht

    folder = Path(tempfile.mkdtemp(prefix="distqat-failover-bench-"))
    bootstrap = start_dht()
    peer = str(bootstrap.get_visible_maddrs()[0])
    running = []
    result: dict = {}
    try:
        for name in ("a", "b"):
            running.append(_expert(folder, name, peer))
            _ready(running[-1][1])
        processes = {_ready(log)[0]: process for process, log, _ in running}

        class KillAndStart(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
                if trainer.global_step == steps // 3 and not result:
                    trainer.strategy.pipeline.wait_for_snapshot()
                    victim = processes[trainer.strategy.current_experts()["blocks.1"]["peer_id"]]
                    result["kill"] = time.time()
                    victim.send_signal(signal.SIGKILL)
                    running.append(_expert(folder, "late", peer))
                    result["launch"] = running[-1][2]

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
                if "kill" in result and "next_step" not in result:
                    result["next_step"] = time.time()

            def on_train_end(self, trainer, pl_module):  # noqa: ANN001
                result["failover"] = trainer.strategy.pipeline.failovers[-1]

        g = torch.Generator().manual_seed(0)
        x = torch.randn(steps * 16, 192, generator=g)
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(
            accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[KillAndStart()],
            strategy=DistqatStrategy(stages=["blocks.0", "blocks.1"], initial_peers=[peer],
                                     experiment="failover-bench", mirror_every=2,
                                     swarm=SwarmConfig(failover_timeout=180, request_timeout=20)))
        trainer.fit(MLPClassifier(in_features=192, width=32, depth=2),
                    DataLoader(TensorDataset(x, x[:, :10].argmax(-1)), batch_size=16))
        _, ready = _ready(running[-1][1])
        failover = result["failover"]
        print("\nB. an auto-assigned expert started after the only expert of a stage died")
        print(f"  launch -> serving (start-up, DHT join, stage chosen): {ready - result['launch']:.1f}s")
        print(f"  serving -> claimed, configured and loaded with the stage's state by the trainer: "
              f"{failover['done_at'] - ready:.1f}s")
        print(f"  kill -> next training step: {result['next_step'] - result['kill']:.1f}s; steps lost: "
              f"{failover['steps_lost']} ({failover['source']})")
    finally:
        for process, _, _ in running:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process, _, _ in running:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        bootstrap.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=160)
    args = parser.parse_args()
    drill(args.steps)
    auto_assigned(args.steps // 3)


if __name__ == "__main__":
    main()
