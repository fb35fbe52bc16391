"""Parity: a 3-stage pipeline through DistqatStrategy gives the parameters that plain Lightning gives.

One swarm of experts serves every test of this module: each fit joins it (``initial_peers``), seeds the experts with
its own weights, configures their optimizers afresh and releases them at the end."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_distqat import DistqatStrategy, SwarmConfig
from lightning_distqat.config import ExpertConfig
from lightning_distqat.swarm.dht import start_dht
from lightning_distqat.swarm.embedded import EmbeddedSwarm
from tests.helpers import ThreeStageNet, fit_params, max_rel_diff, toy_loader

STAGES = ["stem", "body", "head"]

pytestmark = [pytest.mark.swarm]


@pytest.fixture(scope="module")
def peers():
    net = ThreeStageNet()
    experts = EmbeddedSwarm({s: net.get_submodule(s) for s in STAGES}, expert_config=ExpertConfig(experiment="parity"))
    experts.launch()
    dht = start_dht()
    try:
        maddrs = [str(m) for m in dht.get_visible_maddrs()]
        experts.start(maddrs)
        yield maddrs
    finally:
        experts.shutdown()
        dht.shutdown()


@pytest.mark.parametrize(
    ("optimizer", "scheduler", "trainer_kwargs"),
    [
        ("sgd", False, {}),
        ("adamw", False, {}),
        ("sgd", False, {"accumulate_grad_batches": 2}),
        ("adamw", True, {}),
        ("sgd", True, {"gradient_clip_val": 0.05}),
        ("sgd", False, {"gradient_clip_val": 0.01, "gradient_clip_algorithm": "value"}),
    ],
    ids=["sgd-momentum", "adamw-two-groups", "accumulate-2", "adamw-steplr", "sgd-steplr-clip-norm",
         "sgd-clip-value"],
)
def test_parameters_match_plain_lightning(peers, optimizer, scheduler, trainer_kwargs):
    def make():
        return ThreeStageNet(optimizer=optimizer, scheduler=scheduler)

    local, _ = fit_params(make, max_steps=5, **trainer_kwargs)
    strategy = DistqatStrategy(stages=STAGES, initial_peers=peers, experiment="parity")
    remote, trainer = fit_params(make, max_steps=5, strategy=strategy, **trainer_kwargs)

    assert trainer.global_step == 5
    if "gradient_clip_val" in trainer_kwargs:  # the clipping at hand changes the result, so parity covers it
        unclipped, _ = fit_params(make, max_steps=5)
        assert max_rel_diff(unclipped.state_dict(), local.state_dict()) > 1e-3
    diff = max_rel_diff(remote.state_dict(), local.state_dict())
    assert diff <= 1e-5, f"max relative parameter difference {diff:.2e}"
    # the module is whole again: original submodules back in place, trained
    assert type(remote.stem).__name__ == "Sequential"
    before = make().state_dict()
    assert max_rel_diff(remote.state_dict(), before) > 1e-3, "stage weights did not change"


class _ManualClip(ThreeStageNet):
    """Manual optimization that clips by the norm over every stage before stepping."""

    def __init__(self, clip: bool = True) -> None:
        super().__init__(optimizer="sgd")
        self.automatic_optimization, self.clip = False, clip

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        opt = self.optimizers()
        x, y = batch
        opt.zero_grad()
        self.manual_backward(torch.nn.functional.cross_entropy(self(x), y))
        if self.clip:
            self.clip_gradients(opt, gradient_clip_val=0.05, gradient_clip_algorithm="norm")
        opt.step()


def test_manual_optimization_with_clipping_matches_plain_lightning(peers):
    local, _ = fit_params(_ManualClip, max_steps=5)
    unclipped, _ = fit_params(lambda: _ManualClip(clip=False), max_steps=5)
    assert max_rel_diff(unclipped.state_dict(), local.state_dict()) > 1e-3, "the clipping at hand must matter"
    strategy = DistqatStrategy(stages=STAGES, initial_peers=peers, experiment="parity")
    schedule = _Schedule()
    remote, _ = fit_params(_ManualClip, max_steps=5, strategy=strategy, callbacks=[schedule])
    assert max_rel_diff(remote.state_dict(), local.state_dict()) <= 1e-5
    # the Trainer was not told to clip, so backwards bring no norms: the norms are asked for, once per step
    assert schedule.norm_calls == {s: 5 for s in STAGES}


class _Schedule(pl.Callback):
    """Records, per stage, whether tensors went through shared memory, how many session streams were opened and how
    many grad_norm calls were made."""

    def __init__(self) -> None:
        self.shared: dict[str, bool] = {}
        self.sessions: dict[str, int] = {}
        self.norm_calls: dict[str, int] = {}

    def on_train_end(self, trainer, pl_module):  # noqa: ANN001, ANN201
        handles = trainer.strategy.pipeline.handles
        self.shared = {s: h.shares_memory for s, h in handles.items()}
        self.sessions = {s: h.sessions_opened for s, h in handles.items()}
        self.norm_calls = {s: h.grad_norm_calls for s, h in handles.items()}


def _wide_batches():
    return toy_loader(n=320, batch_size=64)  # activations of 8 KiB: above the shared-memory threshold


@pytest.mark.parametrize("micro_batches", [1, 2, 4])
@pytest.mark.parametrize("shared_memory", [True, False], ids=["shared-memory", "bytes"])
@pytest.mark.parametrize("sessions", [True, False], ids=["sessions", "stream-per-call"])
def test_every_schedule_matches_plain_lightning(peers, sessions, shared_memory, micro_batches):
    """Session streams on and off, shared memory on and off, 1, 2 and 4 micro-batches in flight (and the optimizer
    steps never waited for): the parameters after 5 steps are plain Lightning's."""
    local, _ = fit_params(ThreeStageNet, _wide_batches, max_steps=5)
    schedule = _Schedule()
    strategy = DistqatStrategy(stages=STAGES, initial_peers=peers, experiment="parity", micro_batches=micro_batches,
                               swarm=SwarmConfig(shared_memory=shared_memory, sessions=sessions))
    remote, trainer = fit_params(ThreeStageNet, _wide_batches, max_steps=5, strategy=strategy, callbacks=[schedule])
    assert trainer.global_step == 5
    assert schedule.shared == {s: shared_memory for s in STAGES}
    if sessions:  # one stream per expert for the whole fit
        assert schedule.sessions == {s: 1 for s in STAGES}
    else:
        assert schedule.sessions == {s: 0 for s in STAGES}
    diff = max_rel_diff(remote.state_dict(), local.state_dict())
    assert diff <= 1e-5, f"max relative parameter difference {diff:.2e}"


@pytest.mark.parametrize("sessions", [True, False], ids=["sessions", "stream-per-call"])
def test_uneven_micro_batches_with_accumulation_and_clipping_match_plain_lightning(peers, sessions):
    """3 micro-batches of a 64-sample batch (21, 21, 22), 2 batches accumulated, gradients clipped by the norm over
    every stage: the experts' norms come with their backward answers (no grad_norm call)."""
    kwargs = {"max_steps": 3, "accumulate_grad_batches": 2, "gradient_clip_val": 0.05}
    local, _ = fit_params(ThreeStageNet, _wide_batches, **kwargs)
    unclipped, _ = fit_params(ThreeStageNet, _wide_batches, max_steps=3, accumulate_grad_batches=2)
    assert max_rel_diff(unclipped.state_dict(), local.state_dict()) > 1e-3, "the clipping at hand must matter"
    schedule = _Schedule()
    strategy = DistqatStrategy(stages=STAGES, initial_peers=peers, experiment="parity", micro_batches=3,
                               swarm=SwarmConfig(sessions=sessions))
    remote, _ = fit_params(ThreeStageNet, _wide_batches, strategy=strategy, callbacks=[schedule], **kwargs)
    assert schedule.norm_calls == {s: 0 for s in STAGES}
    diff = max_rel_diff(remote.state_dict(), local.state_dict())
    assert diff <= 1e-5, f"max relative parameter difference {diff:.2e}"
