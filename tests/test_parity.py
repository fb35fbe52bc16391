"""Parity: a 3-stage pipeline through DistqatStrategy gives the parameters that plain Lightning gives."""

from __future__ import annotations

import pytest

from lightning_distqat import DistqatStrategy
from tests.helpers import ThreeStageNet, fit_params, max_rel_diff

STAGES = ["stem", "body", "head"]

pytestmark = [pytest.mark.swarm]


@pytest.mark.parametrize(
    ("optimizer", "scheduler", "trainer_kwargs"),
    [
        ("sgd", False, {}),
        ("adamw", False, {}),
        ("sgd", False, {"accumulate_grad_batches": 2}),
        ("adamw", True, {}),
        ("sgd", True, {"gradient_clip_val": 0.05}),
    ],
    ids=["sgd-momentum", "adamw-two-groups", "accumulate-2", "adamw-steplr", "sgd-steplr-clip-norm"],
)
def test_parameters_match_plain_lightning(optimizer, scheduler, trainer_kwargs):
    def make():
        return ThreeStageNet(optimizer=optimizer, scheduler=scheduler)

    local, _ = fit_params(make, max_steps=5, **trainer_kwargs)
    remote, trainer = fit_params(make, max_steps=5, strategy=DistqatStrategy(stages=STAGES), **trainer_kwargs)

    assert trainer.global_step == 5
    diff = max_rel_diff(remote.state_dict(), local.state_dict())
    assert diff <= 1e-5, f"max relative parameter difference {diff:.2e}"
    # the module is whole again: original submodules back in place, trained
    assert type(remote.stem).__name__ == "Sequential"
    before = make().state_dict()
    assert max_rel_diff(remote.state_dict(), before) > 1e-3, "stage weights did not change"
