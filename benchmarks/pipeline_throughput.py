"""Throughput of the 3-stage embedded pipeline relative to training the same module in one process.

For a small and a medium stage width, local and DistqatStrategy fits alternate (ROUNDS times each, in one run);
samples/s are timed from on_train_start to on_train_end, so the swarm's start-up and teardown are excluded (and printed
apart: the rest of the fit).
Every process runs with OMP_NUM_THREADS=1.

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

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_distqat import DistqatStrategy  # noqa: E402
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


def _fit(width: int, steps: int, batch: int, remote: bool) -> tuple[float, float]:
    """Returns (samples/s during training, seconds of set-up before training started)."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(batch * steps, width), torch.randint(0, 10, (batch * steps,)))
    summary = TrainingSummary()
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[summary],
        strategy=DistqatStrategy(stages=["stem", "body", "head"]) if remote else "auto",
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
        local, remote, setup = [], [], []
        for _ in range(args.rounds):
            local.append(_fit(width, args.steps, args.batch, remote=False)[0])
            sps, secs = _fit(width, args.steps, args.batch, remote=True)
            remote.append(sps)
            setup.append(secs)
        params = sum(p.numel() for p in Mlp3(width).parameters())
        rows.append((width, params, statistics.median(local), statistics.median(remote), statistics.median(setup)))
        print(f"width {width}: local {local}, distqat {remote}", flush=True)

    print(f"\nbatch {args.batch}, {args.steps} steps per fit, median of {args.rounds} alternating rounds, "
          "OMP_NUM_THREADS=1 per process\n")
    print("| stage width | params | one process (samples/s) | 3-stage pipeline (samples/s) | ratio | swarm start + stop (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for width, params, loc, rem, setup in rows:
        print(f"| {width} | {params / 1e6:.2f} M | {loc:.0f} | {rem:.0f} | {rem / loc:.2f} | {setup:.1f} |")


if __name__ == "__main__":
    main()
