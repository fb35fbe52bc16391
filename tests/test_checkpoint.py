"""Checkpoints hold the complete model: remote stage weights and optimizer states, in the plain-Lightning layout."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_distqat import DistqatStrategy
from tests.helpers import ThreeStageNet, fit_params, max_rel_diff, toy_loader

pytestmark = [pytest.mark.swarm, pytest.mark.slow]
STAGES = ["stem", "body", "head"]


def _make():
    return ThreeStageNet(optimizer="adamw", scheduler=True)


def _loader():
    return toy_loader(n=32)  # 4 steps per epoch: checkpoints fall on epoch boundaries


def _assert_same_optimizer_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for idx in a["state"]:
        for key, value in a["state"][idx].items():
            other = b["state"][idx][key]
            if isinstance(value, torch.Tensor):
                assert torch.allclose(value.float(), other.float(), rtol=1e-5, atol=1e-7), (idx, key)
            else:
                assert value == other, (idx, key)


def test_checkpoint_round_trip_and_resume(tmp_path):
    # a plain-Lightning reference checkpoint after one epoch
    plain_cb = ModelCheckpoint(dirpath=tmp_path / "plain", save_top_k=-1)
    fit_params(_make, _loader, max_epochs=1, callbacks=[plain_cb], enable_checkpointing=True)
    plain = torch.load(plain_cb.best_model_path or plain_cb.last_model_path or _only(tmp_path / "plain"),
                       weights_only=False)

    # the same epoch through the swarm; ModelCheckpoint saves while the stages live on the experts
    swarm_cb = ModelCheckpoint(dirpath=tmp_path / "swarm", save_top_k=-1)
    model, trainer = fit_params(
        _make, _loader, max_epochs=1, callbacks=[swarm_cb], enable_checkpointing=True,
        strategy=DistqatStrategy(stages=STAGES),
    )
    path = _only(tmp_path / "swarm")
    saved = torch.load(path, weights_only=False)
    assert max_rel_diff(saved["state_dict"], plain["state_dict"]) <= 1e-5
    assert len(saved["optimizer_states"]) == 1
    _assert_same_optimizer_state(saved["optimizer_states"][0], plain["optimizer_states"][0])
    assert saved["lr_schedulers"] == plain["lr_schedulers"]

    # after fit the module and its optimizer are whole again: a checkpoint saved now holds the same
    trainer.save_checkpoint(tmp_path / "after_fit.ckpt")
    after = torch.load(tmp_path / "after_fit.ckpt", weights_only=False)
    assert max_rel_diff(after["state_dict"], saved["state_dict"]) == 0.0
    _assert_same_optimizer_state(after["optimizer_states"][0], saved["optimizer_states"][0])

    # resume in a new Trainer from a differently initialised module: it must end where an uninterrupted run ends
    def make_other():
        torch.manual_seed(123)
        return _make()

    resumed = make_other()
    from tests.helpers import quiet_trainer

    quiet_trainer(max_epochs=2, strategy=DistqatStrategy(stages=STAGES)).fit(resumed, _loader(), ckpt_path=path)
    uninterrupted, _ = fit_params(_make, _loader, max_epochs=2)
    assert max_rel_diff(resumed.state_dict(), uninterrupted.state_dict()) <= 1e-5


def _only(folder):
    files = sorted(folder.glob("*.ckpt"))
    assert len(files) == 1, files
    return files[0]


def test_a_resumed_diloco_run_continues_its_outer_optimizer(tmp_path):
    """DiLoCo (one pipeline, an outer round every 3 inner steps) checkpointed after 4 steps, mid-round: the
    checkpoint holds every stage's outer params, outer momentum and round, and the inner-step count, so a resumed
    run ends where an uninterrupted one does."""
    from lightning_distqat import DiLoCoConfig
    from tests.helpers import quiet_trainer

    def strategy():
        return DistqatStrategy(stages=STAGES, diloco=DiLoCoConfig(inner_steps=3))

    callback = ModelCheckpoint(dirpath=tmp_path / "diloco", save_top_k=-1)
    fit_params(ThreeStageNet, _loader, max_epochs=1, callbacks=[callback], enable_checkpointing=True,
               strategy=strategy())
    path = _only(tmp_path / "diloco")
    saved = torch.load(path, weights_only=False)["callbacks"]["DistqatDiLoCo"]["diloco"]
    assert saved["inner_steps"] == 4 and set(saved["stages"]) == set(STAGES)
    assert all(part["round"] == 1 and part["optimizer"]["state"] for part in saved["stages"].values())

    torch.manual_seed(123)
    resumed = ThreeStageNet()
    trainer = quiet_trainer(max_epochs=2, strategy=strategy())
    trainer.fit(resumed, _loader(), ckpt_path=path)
    assert [r["round"] for r in trainer.strategy.diloco_reports] == [2]  # at inner step 6, as without the pause
    uninterrupted, _ = fit_params(ThreeStageNet, _loader, max_epochs=2, strategy=strategy())
    assert max_rel_diff(resumed.state_dict(), uninterrupted.state_dict()) <= 1e-5
