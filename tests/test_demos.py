"""Lightning's own demo models train unmodified with their submodules as stages; evaluation loops use the proxies."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import BoringModel, DemoModel, RandomDataset
from torch.utils.data import DataLoader

from lightning_distqat import DistqatStrategy  # importing the package registers "distqat"
from tests.helpers import quiet_trainer

pytestmark = [pytest.mark.swarm]


def test_strategy_name_resolves():
    trainer = quiet_trainer(strategy="distqat")
    assert isinstance(trainer.strategy, DistqatStrategy)


@pytest.mark.timeout(420)
def test_boring_model_fit_validate_test_predict():
    torch.manual_seed(0)
    model = BoringModel()
    before = model.layer.weight.detach().clone()
    trainer = quiet_trainer(max_steps=4, limit_val_batches=2, limit_test_batches=2, limit_predict_batches=2,
                            strategy=DistqatStrategy(stages=["layer"]))
    trainer.fit(model)
    assert trainer.global_step == 4
    assert isinstance(model.layer, torch.nn.Linear), "the original submodule is back in place after fit"
    assert not torch.equal(model.layer.weight, before), "the stage was trained"

    trained = model.layer.weight.detach().clone()
    losses = _EvalLosses()
    trainer.callbacks.append(losses)
    trainer.validate(model)
    trainer.test(model)
    predictions = trainer.predict(model)
    assert len(losses.val) == 2 and len(losses.test) == 2
    assert all(torch.isfinite(x) for x in losses.val + losses.test)
    expected = model(torch.ones(2, 32))  # local forward with the trained weights
    assert len(predictions) == 2 and predictions[0].shape == (1, 2)
    assert torch.equal(model.layer.weight, trained), "evaluation must not change weights"
    remote_out = quiet_trainer(strategy=DistqatStrategy(stages=["layer"])).predict(
        model, DataLoader(torch.ones(2, 32), batch_size=2)
    )[0]
    assert torch.allclose(remote_out, expected, atol=1e-6)


class _EvalLosses(Callback):
    def __init__(self) -> None:
        self.val: list[torch.Tensor] = []
        self.test: list[torch.Tensor] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.val.append(outputs["x"])

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.test.append(outputs["y"])


def test_demo_model_trains():
    torch.manual_seed(0)
    model = DemoModel()
    loader = DataLoader(RandomDataset(32, 64), batch_size=8)
    first = float(model.training_step(next(iter(loader)), 0))
    trainer = quiet_trainer(max_epochs=3, strategy=DistqatStrategy(stages=["l1"]))
    trainer.fit(model, loader)
    assert trainer.global_step == 24
    assert float(model.training_step(next(iter(loader)), 0)) < first  # its loss (sum of activations) went down
