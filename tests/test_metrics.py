"""What a user sees of a swarm fit: the model summary counts the remote stages, the swarm's series reach a real
CSVLogger, and DiLoCo takes the outer optimizer named by class path."""

from __future__ import annotations

import csv
import re

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count

from lightning_distqat import DiLoCoConfig, DistqatStrategy
from tests.helpers import ThreeStageNet, quiet_trainer, toy_loader

pytestmark = [pytest.mark.swarm, pytest.mark.slow]
STAGES = ["stem", "body", "head"]
OUTER_LR = 0.7


class _FirstRound(Callback):
    """Keeps the weights of the trainer's own parameter and of every stage's expert right after round 1."""

    def __init__(self) -> None:
        self.after: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
        if len(trainer.strategy.diloco_reports) == 1 and not self.after:
            self.after = {"temperature": pl_module.temperature.detach().clone(),
                          **trainer.strategy.pipeline.module_state_dict()}


def test_summary_logger_series_and_outer_optimizer_by_class_path(tmp_path, capsys):
    torch.manual_seed(0)
    model = ThreeStageNet()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    first_round = _FirstRound()
    strategy = DistqatStrategy(
        stages=STAGES, diloco=DiLoCoConfig(inner_steps=2, outer_lr=OUTER_LR, outer_optimizer="torch.optim.Adam"),
    )
    trainer = quiet_trainer(max_steps=4, strategy=strategy, enable_model_summary=True, log_every_n_steps=1,
                            logger=CSVLogger(tmp_path, name="run"), callbacks=[first_round])
    trainer.fit(model, toy_loader())

    # the model summary (Lightning's rich table here) counts the parameters that live on the experts
    summary = capsys.readouterr().out
    total = get_human_readable_count(sum(p.numel() for p in model.parameters())).strip()
    assert re.search(rf"Total params: {re.escape(total)}\b", summary), summary
    for stage in STAGES:
        count = get_human_readable_count(sum(p.numel() for p in model.get_submodule(stage).parameters())).strip()
        row = next(line for line in summary.splitlines() if f" {stage} " in line)
        assert re.search(rf"\(remote\)\W+{re.escape(count)}\W", row), row

    # the swarm's series reach the logger: wire bytes every step, one row per outer round
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    sent = [float(r["wire/bytes_sent"]) for r in rows if r.get("wire/bytes_sent")]
    assert len(sent) >= 3 and sent == sorted(sent) and sent[0] > 0, sent
    rounds = [(int(r["step"]), float(r["diloco/round"])) for r in rows if r.get("diloco/round")]
    assert rounds == [(2, 1.0), (4, 2.0)], rounds

    # the outer optimizer is Adam: its first step moves a parameter by outer_lr * g / (|g| + eps), i.e. by outer_lr
    # unless its pseudo-gradient g is tiny (an SGD outer step would move it by a multiple of g instead)
    assert first_round.after, "no round was seen"
    for name, after in first_round.after.items():
        moved = (after - initial[name]).abs().flatten()
        assert float(moved.max()) <= OUTER_LR + 1e-4, (name, moved)
        assert abs(float(moved[moved > 1e-6].median()) - OUTER_LR) < 1e-3, (name, moved)
