"""One trainer of the data-server tests: a small classifier on the digits, fed by a running `distqat-data`.

    python -m tests.data_trainer ADDRESS TRAINER_ID OUT_FILE [--hang-at N] [--embedded]

Appends the sample ids of every training step to OUT_FILE (one line per batch, written in training_step). With
--hang-at N it writes OUT_FILE.hung at batch N, before recording it, and waits there to be killed.
"""

from __future__ import annotations

import argparse
import logging
import threading
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from lightning_distqat import DataConfig, SharedMemoryDataModule

DIGITS = dict(source="sklearn-digits", image_size=8, channels=1, batch_size=16, seed=3, shuffle_buffer=500)


class TinyDigits(pl.LightningModule):
    def __init__(self, out: Path, hang_at: int | None) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                       torch.nn.Linear(32, 10))
        self.out, self.hang_at = out, hang_at

    def training_step(self, batch, batch_idx):
        if batch_idx == self.hang_at:
            Path(f"{self.out}.hung").write_text(str(batch_idx))
            threading.Event().wait(120)  # killed here by the test; bounded so that nothing hangs for good
            raise SystemExit("data_trainer: was not killed")
        with open(self.out, "a") as f:
            f.write(" ".join(str(i) for i in batch["sample_ids"].tolist()) + "\n")
        return F.cross_entropy(self.net(batch["pixel_values"]), batch["labels"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("trainer_id", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("--hang-at", type=int, default=None)
    parser.add_argument("--num-trainers", type=int, default=3)
    parser.add_argument("--embedded", action="store_true", help="start an embedded server (ADDRESS is ignored)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("lightning_distqat").setLevel(logging.INFO)
    if args.embedded:
        data = SharedMemoryDataModule(DataConfig(**DIGITS))
    else:
        data = SharedMemoryDataModule(DataConfig(**DIGITS, num_trainers=args.num_trainers, address=args.address),
                                      trainer_id=args.trainer_id, embedded=False)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TinyDigits(args.out, args.hang_at), datamodule=data)


if __name__ == "__main__":
    main()
