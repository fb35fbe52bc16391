"""Throughput of the 3-stage embedded pipeline relative to training the same module in one process.

For a small and a medium stage width, the one-process fit and every pipeline schedule alternate (ROUNDS times each,
in one run): tensors as bytes on a new P2P stream per call, then through shared memory, then on one session stream
per expert (the defaults), and with 2 and 4 micro-batches in flight; samples/s are timed from on_train_start to on_train_end, so the swarm's start-up and
teardown are excluded (and printed apart: the rest of the fit). Every process runs with OMP_NUM_THREADS=1.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pipeline_throughput.py [--steps 40] [--rounds 3]
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported; spawned experts inherit it

import argparse  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Optional  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_distqat import DistqatStrategy, SwarmConfig  # noqa: E402
from lightning_distqat.callbacks import TrainingSummary  # noqa: E402


class Mlp3(pl.LightningModule):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.GELU())
        self.body = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.GELU())
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


SCHEDULES = {
    "bytes, a stream per call": {"swarm": SwarmConfig(shared_memory=False, sessions=False)},
    "+ shared memory": {"swarm": SwarmConfig(sessions=False)},
    "+ sessions (default)": {},
    "+ 2 micro-batches": {"micro_batches": 2},
    "+ 4 micro-batches": {"micro_batches": 4},
}


def _fit(width: int, steps: int, batch: int, schedule: Optional[dict]) -> tuple[float, float]:
    """Returns (samples/s during training, seconds of set-up before training started); ``schedule``: the
    DistqatStrategy's arguments, None for one process."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(batch * steps, width), torch.randint(0, 10, (batch * steps,)))
    summary = TrainingSummary()
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[summary],
        strategy=DistqatStrategy(stages=["stem", "body", "head"], **schedule) if schedule is not None else "auto",
    )
    start = time.perf_counter()
    trainer.fit(Mlp3(width), DataLoader(data, batch_size=batch))
    total = time.perf_counter() - start
    return summary.summary["samples_per_second"], total - summary.summary["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 1024])
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning_distqat", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)

    rows = []
    for width in args.widths:
        local: list[float] = []
        remote: dict[str, list[float]] = {name: [] for name in SCHEDULES}
        setup: list[float] = []
        for _ in range(args.rounds):
            local.append(_fit(width, args.steps, args.batch, None)[0])
            for name, schedule in SCHEDULES.items():
                sps, secs = _fit(width, args.steps, args.batch, schedule)
                remote[name].append(sps)
                setup.append(secs)
        params = sum(p.numel() for p in Mlp3(width).parameters())
        rows.append((width, params, statistics.median(local), {k: statistics.median(v) for k, v in remote.items()},
                     statistics.median(setup)))
        print(f"width {width}: local {[round(v) for v in local]}, "
              + ", ".join(f"{k} {[round(v) for v in vs]}" for k, vs in remote.items()), flush=True)

    print(f"\nbatch {args.batch}, {args.steps} steps per fit, median of {args.rounds} alternating rounds, "
          "OMP_NUM_THREADS=1 per process; samples/s (ratio to one process)\n")
    print("| stage width | params | one process | " + " | ".join(SCHEDULES) + " | swarm start + stop (s) |")
    print("|---:|---:|---:|" + "---:|" * len(SCHEDULES) + "---:|")
    for width, params, loc, rem, setup in rows:
        cells = " | ".join(f"{v:.0f} ({v / loc:.2f})" for v in rem.values())
        print(f"| {width} | {params / 1e6:.2f} M | {loc:.0f} | {cells} | {setup:.1f} |")


if __name__ == "__main__":
    main()
