"""`Trainer(devices=2)` with DistqatStrategy and DiLoCo: `python tests/multi_trainer.py OUT_DIR pipeline|data|broken`.

Lightning's launcher re-runs this script as rank 1. Each rank saves its DiLoCo reports, losses and final parameters
to OUT_DIR/rank<r>.pt. In ``broken`` mode one stage's class exists only in the trainers (a module made at run time),
so rank 0's embedded experts cannot start.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_distqat import DiLoCoConfig, DistqatStrategy
from tests.helpers import ThreeStageNet, toy_loader


class _Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
        self.losses.append(float(outputs["loss"]))


if __name__ == "__main__":
    out_dir, mode = sys.argv[1], sys.argv[2]
    pl.seed_everything(0)
    losses = _Losses()
    strategy = DistqatStrategy(
        stages=["stem", "body", "head"] if mode in ("pipeline", "broken") else None,
        experiment=f"multi-{mode}",
        diloco=DiLoCoConfig(inner_steps=3, matchmaking_time=2.0, averaging_timeout=30.0),
    )
    trainer = pl.Trainer(accelerator="cpu", devices=2, max_steps=9, strategy=strategy, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[losses])
    model = ThreeStageNet(optimizer="adamw")
    if mode == "broken":
        import types

        only_here = types.ModuleType("only_in_the_trainers")
        exec("from torch import nn\nclass Body(nn.Linear):\n    pass\n", only_here.__dict__)
        sys.modules[only_here.__name__] = only_here
        model.body = only_here.Body(32, 32)
    trainer.fit(model, toy_loader(n=256))
    torch.save({"reports": strategy.diloco_reports, "losses": losses.losses, "state": model.state_dict()},
               f"{out_dir}/rank{trainer.global_rank}.pt")
