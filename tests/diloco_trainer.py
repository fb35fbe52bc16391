"""A trainer process for the DiLoCo tests: `python -m tests.diloco_trainer OUT RANK MAX_STEPS PEER [--stages]
[--adaptive] [--width=N] [--batch=N] [--mirror-every=N] [--h=N] [--hold]` (adaptive batch sizing; the model's
width, the loader's batch size, steps between snapshots, inner steps per round; after round 1, wait for a line on
stdin, so that a test can act between rounds 1 and 2 whatever the machine's speed).

Prints "PIPELINE <json of stage -> expert peer id>" when training starts, "ROUND <n> <group size>" after every outer
round, and saves its reports and final parameters to OUT.
"""

from __future__ import annotations

import json
import select
import sys
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_distqat import DiLoCoConfig, DistqatStrategy, SwarmConfig
from lightning_distqat.callbacks import TrainingSummary
from tests.helpers import ThreeStageNet, toy_loader

H = 3


class _Announce(Callback):
    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.seen = 0
        self.losses: list[float] = []
        self.round_ends: list[float] = []  # wall clock when each round's report arrived

    def on_train_start(self, trainer, pl_module):  # noqa: ANN001
        experts = trainer.strategy.current_experts()
        print("PIPELINE " + json.dumps({stage: e["peer_id"] for stage, e in experts.items()}), flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
        self.losses.append(float(outputs["loss"]))
        reports = trainer.strategy.diloco_reports
        while self.seen < len(reports):
            print(f"ROUND {reports[self.seen]['round']} {reports[self.seen]['group_size']}", flush=True)
            self.round_ends.append(time.time())
            self.seen += 1
            if self.hold and self.seen == 1:  # a line on stdin says go on
                if not select.select([sys.stdin], [], [], 120)[0]:
                    raise TimeoutError("diloco_trainer: no line on stdin within 120 s after round 1 (--hold)")
                sys.stdin.readline()


def main() -> None:
    out, rank, max_steps, peer = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    stages = ["stem", "body", "head"] if "--stages" in sys.argv else None
    options = dict(arg.removeprefix("--").split("=") for arg in sys.argv[5:] if "=" in arg)
    pl.seed_everything(0)  # same initial weights on every replica
    model = ThreeStageNet(optimizer="adamw", width=int(options.get("width", 32)))
    announce = _Announce(hold="--hold" in sys.argv)
    strategy = DistqatStrategy(
        stages=stages,
        swarm=SwarmConfig(experiment="dl-test", initial_peers=[peer], discovery_timeout=90,
                          mirror_every=int(options.get("mirror-every", 10))),
        diloco=DiLoCoConfig(inner_steps=int(options.get("h", H)), matchmaking_time=2.0, averaging_timeout=20.0,
                            adaptive_batch_size="--adaptive" in sys.argv),
    )
    summary = TrainingSummary()
    trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[announce, summary], strategy=strategy)
    batch = int(options.get("batch", 8))  # a different shard of data per replica:
    trainer.fit(model, toy_loader(n=max(256, 2 * batch), batch_size=batch, seed=100 + rank))
    torch.save({"reports": strategy.diloco_reports, "losses": announce.losses, "state": model.state_dict(),
                "seconds": summary.summary["seconds"], "round_ends": announce.round_ends}, out)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
