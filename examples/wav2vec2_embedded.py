"""wav2vec 2.0 (transformers' modules, random init) learns to transcribe spoken-digit-like clips with CTC while its
feature encoder, two groups of encoder layers and its CTC head run on four experts of an embedded hivemind swarm.

The clips are made here (``synthetic-spoken-digits``: voiced words with their own formants, written once to
~/.cache/distqat as a save_to_disk folder with an audio column, and loaded like yours), so nothing is downloaded.
``--diloco`` runs two DiLoCo replicas (``devices=2``) that average every 10 inner steps.
"""

from __future__ import annotations

import argparse
import logging

import lightning.pytorch as pl

from lightning_distqat import DataConfig, DiLoCoConfig, DistqatStrategy, SharedMemoryDataModule
from lightning_distqat.callbacks import TrainingSummary
from lightning_distqat.models import Wav2Vec2CTC


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--diloco", action="store_true", help="two DiLoCo replicas (devices=2)")
    parser.add_argument("--experiment", default="wav2vec2-digits")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("lightning_distqat").setLevel(logging.INFO)

    pl.seed_everything(0)
    data = SharedMemoryDataModule(DataConfig(source="synthetic-spoken-digits", task="speech", tokenizer="bytes",
                                             max_audio_seconds=2.0, batch_size=args.batch_size, drop_last=True,
                                             seed=0))
    model = Wav2Vec2CTC(hidden_size=64, num_heads=4, intermediate_size=128, stage_layers=[2, 2], lr=1e-3)
    diloco = DiLoCoConfig(inner_steps=10, averaging_timeout=60.0) if args.diloco else None
    summary = TrainingSummary()
    trainer = pl.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=2 if args.diloco else 1, logger=False,
        enable_checkpointing=False, callbacks=[summary], log_every_n_steps=5,
        strategy=DistqatStrategy(stages=model.STAGES, experiment=args.experiment, diloco=diloco),
    )
    trainer.fit(model, datamodule=data)
    s = summary.summary
    if trainer.global_rank == 0 and (s.get("first_loss") is None or s.get("final_loss") is None
                                     or not s["final_loss"] < s["first_loss"]):
        raise SystemExit(f"the training loss did not go down ({s.get('first_loss')} -> {s.get('final_loss')})")


if __name__ == "__main__":
    main()
