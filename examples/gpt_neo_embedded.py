"""GPT-Neo (transformers' blocks, random init) learns short stories byte by byte while its embeddings, two groups of
blocks and its LM head run on four experts of an embedded hivemind swarm on this machine.

The stories are made here (``synthetic-stories``: written once to ~/.cache/distqat as a text file and loaded like
yours), so nothing is downloaded. ``--quant int8_wire`` sends activations and gradients as int8; ``--quant qat``
trains the blocks' linear layers with torchao's int8-activation/int4-weight fake quantization.
"""

from __future__ import annotations

import argparse
import logging

import lightning.pytorch as pl

from lightning_distqat import DataConfig, DistqatStrategy, QuantConfig, SharedMemoryDataModule
from lightning_distqat.callbacks import TrainingSummary
from lightning_distqat.models import GPTNeoLM

QUANT = {"none": None, "int8_wire": QuantConfig(activations="int8", gradients="int8"),
         "qat": QuantConfig(qat="int8-int4", qat_group_size=32, activations="int8", gradients="int8")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--quant", choices=sorted(QUANT), default="none")
    parser.add_argument("--experiment", default="gpt-neo-stories")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("lightning_distqat").setLevel(logging.INFO)

    pl.seed_everything(0)
    data = SharedMemoryDataModule(DataConfig(source="synthetic-stories", task="causal_lm", tokenizer="bytes",
                                             seq_len=args.seq_len, batch_size=args.batch_size, drop_last=True, seed=0))
    model = GPTNeoLM(vocab_size=257, hidden_size=64, num_heads=4, stage_layers=[2, 2], lr=1e-3)
    summary = TrainingSummary()
    trainer = pl.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        strategy=DistqatStrategy(stages=model.STAGES, experiment=args.experiment, quant=QUANT[args.quant]),
        callbacks=[summary], log_every_n_steps=5,
    )
    trainer.fit(model, datamodule=data)
    s = summary.summary
    if s.get("first_loss") is None or s.get("final_loss") is None or not s["final_loss"] < s["first_loss"]:
        raise SystemExit(f"the training loss did not go down ({s.get('first_loss')} -> {s.get('final_loss')})")


if __name__ == "__main__":
    main()
