"""The main job (`make run`): ResNet-18 (torchvision, random init) learns real handwritten digits while its four
residual layers run on four experts of an embedded hivemind swarm on this machine.

The LightningModule is ordinary Lightning code; the only distqat line is the strategy. Batches come from the
shared-memory data server (started here as a child process: it loads, shuffles and transforms the digits once).
"""

from __future__ import annotations

import argparse
import logging

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from lightning_distqat import DataConfig, DistqatStrategy, SharedMemoryDataModule
from lightning_distqat.callbacks import TrainingSummary
from lightning_distqat.models import ResNetClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--experiment", default="resnet-digits")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("lightning_distqat").setLevel(logging.INFO)

    pl.seed_everything(0)
    data = SharedMemoryDataModule(DataConfig(source="sklearn-digits", task="image_classification", image_size=32,
                                             val_fraction=0.15, batch_size=args.batch_size, drop_last=True, seed=0))
    steps_per_epoch = int(1797 * 0.85) // args.batch_size  # scikit-learn's digits: 1797 scans, 15% held out
    model = ResNetClassifier("resnet18", num_classes=10, lr=0.05, max_steps=args.epochs * steps_per_epoch)
    summary = TrainingSummary()
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        strategy=DistqatStrategy(stages=ResNetClassifier.STAGES, experiment=args.experiment),
        logger=CSVLogger("logs", name=args.experiment),
        callbacks=[summary],
        log_every_n_steps=5,
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=data)
    s = summary.summary
    if s.get("first_loss") is not None and s.get("final_loss") is not None and s["final_loss"] >= s["first_loss"]:
        raise SystemExit(f"training loss did not go down ({s['first_loss']:.4f} -> {s['final_loss']:.4f})")


if __name__ == "__main__":
    main()
