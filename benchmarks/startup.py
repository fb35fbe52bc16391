"""Start-up of the embedded swarm: seconds from ``trainer.fit`` to the first training step of a 3-stage pipeline,
and where they go.

Every round runs in a fresh trainer process (its own imports done before ``fit``, as in a user's script), with
``OMP_NUM_THREADS=1`` in every process. Goal: <= 8 s on 2 cores.

    .venv/bin/python benchmarks/startup.py [--rounds 3] [--width 256]
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported; the experts inherit it

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

ROWS = [
    ("trainer DHT node", "dht"),
    ("experts: interpreter + imports", "interpreter + imports"),
    ("experts: waiting for the stage", "waiting for the stage"),
    ("experts: model load", "model load"),
    ("experts: DHT join", "DHT join"),
    ("experts: serving", "serving"),
    ("until every expert serves (after the DHT node)", "experts"),
    ("claim", "claim"),
    ("optimizers on the experts", "configure"),
    ("fit -> first training step", "total"),
]


def one(width: int) -> dict[str, float]:
    """One fit in this process; returns the split (seconds)."""
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.callbacks import Callback
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_distqat import DistqatStrategy

    class Mlp3(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Linear(width, width), nn.GELU())
            self.body = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.GELU())
            self.head = nn.Linear(width, 10)

        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            x, y = batch
            return F.cross_entropy(self.head(self.body(self.stem(x))), y)

        def configure_optimizers(self):  # noqa: ANN201
            return torch.optim.SGD(self.parameters(), lr=0.01)

    split: dict[str, float] = {}

    class FirstStep(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            if not split:
                membership = trainer.strategy.membership
                split.update(membership.timings)
                split.update(membership.embedded.startup_split())
                split["total"] = time.monotonic() - start

    data = DataLoader(TensorDataset(torch.randn(64, width), torch.randint(0, 10, (64,))), batch_size=32)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[FirstStep()],
                         strategy=DistqatStrategy(stages=["stem", "body", "head"], experiment="startup-bench"))
    start = time.monotonic()
    trainer.fit(Mlp3(), data)
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("SPLIT " + json.dumps(one(args.width)), flush=True)
        return
    runs = []
    for r in range(args.rounds):
        result = subprocess.run([sys.executable, __file__, "--one", "--width", str(args.width)], capture_output=True,
                                text=True, timeout=600)
        line = next((x for x in result.stdout.splitlines() if x.startswith("SPLIT ")), None)
        if line is None:
            raise SystemExit(f"round {r} failed:\n{(result.stdout + result.stderr)[-3000:]}")
        runs.append(json.loads(line[6:]))
        print(f"round {r + 1}: fit -> first step {runs[-1]['total']:.2f}s", flush=True)
    print(f"\n3-stage pipeline (width {args.width}), {args.rounds} rounds, median seconds "
          "(expert phases: the slowest of the 3 experts)\n")
    print("| phase | seconds |\n|---|---:|")
    for label, key in ROWS:
        print(f"| {label} | {statistics.median(run.get(key, 0.0) for run in runs):.2f} |")
    total = statistics.median(run["total"] for run in runs)
    print(f"\ngoal <= 8 s: {'met' if total <= 8.0 else 'NOT met'} ({total:.2f} s)")


if __name__ == "__main__":
    main()
