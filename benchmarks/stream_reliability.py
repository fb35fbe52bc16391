"""Streamed calls that lose their answer: many small forward/backward calls through a 3-stage embedded pipeline,
counting the calls whose P2P stream ended before the whole answer came (each is retried once and logged).

Small stages make the run a stream of short calls, which is where a lost answer showed up (about 1 call in 9000 under
load before callers started closing the streams themselves; see docs/architecture.md, "One training step").

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stream_reliability.py [--steps 3000]
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported; spawned experts inherit it

import argparse  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_distqat import DistqatStrategy  # noqa: E402


class _Net(pl.LightningModule):
    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(16, width), nn.Tanh())
        self.body = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.head = nn.Linear(width, 4)

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        x, y = batch
        return F.cross_entropy(self.head(self.body(self.stem(x))), y)

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.05)


class _CountRetries(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "trying once more" in record.getMessage()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    retries = _CountRetries()
    logging.getLogger("lightning_distqat.swarm.remote").addHandler(retries)
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    loader = DataLoader(TensorDataset(x, (x[:, :4]).argmax(-1)), batch_size=64)
    strategy = DistqatStrategy(stages=["stem", "body", "head"], experiment="stream-reliability")
    started = time.monotonic()
    pl.Trainer(max_steps=args.steps, max_epochs=-1, accelerator="cpu", devices=1, strategy=strategy, logger=False,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(_Net(), loader)
    calls = 2 * 3 * args.steps
    print(f"{args.steps} steps ({calls} streamed forward/backward calls) in {time.monotonic() - started:.0f}s: "
          f"{retries.count} answer(s) lost and retried ({retries.count / calls:.1e} per call)")


if __name__ == "__main__":
    main()
