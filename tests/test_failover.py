"""Experts come and go: a trainer whose expert dies takes a spare of the same stage, brings it to the stage's last
snapshot, re-runs the step in flight and goes on. Real experts, real SIGKILL, a real Lightning Trainer."""

from __future__ import annotations

import os
import signal
import time

import pytest
from lightning.pytorch.callbacks import Callback

from lightning_distqat import DistqatStrategy, SwarmConfig
from lightning_distqat.swarm.client import PipelineUnavailableError
from tests.helpers import ThreeStageNet, fit_params, max_rel_diff, quiet_trainer, toy_loader, wait_gone

pytestmark = [pytest.mark.swarm]


class KillCurrentExpert(Callback):
    """SIGKILLs the expert that serves ``stage`` now, at ``when`` (``batch_start``, ``before_backward`` or
    ``before_optimizer_step``) of the batch of ``step``, after the snapshot of the step before has landed (so that
    the replacement can start from exactly where the dead one was)."""

    def __init__(self, stage: str, step: int, when: str = "batch_start", sig: int = signal.SIGKILL) -> None:
        self.stage, self.step, self.when, self.sig = stage, step, when, sig
        self.exit_code = None
        self.killed: dict = {}
        self.replaced_by: dict = {}

    def _kill(self, trainer) -> None:  # noqa: ANN001
        strategy = trainer.strategy
        if trainer.global_step != self.step or self.killed:
            return
        strategy.pipeline.wait_for_snapshot()
        self.killed = strategy.current_experts()[self.stage]
        os.kill(self.killed["pid"], self.sig)
        if self.sig != signal.SIGKILL:
            return  # a graceful leave: the expert stays until the trainer took its state
        wait_gone({self.killed["pid"]}, 10)  # gone for good before the batch goes on

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        if self.when == "batch_start":
            self._kill(trainer)

    def on_before_backward(self, trainer, pl_module, loss):  # noqa: ANN001
        last_of_window = (trainer.fit_loop.batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if self.when == "before_backward" and last_of_window:  # with accumulation: after a whole micro-batch
            self._kill(trainer)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # noqa: ANN001
        if self.when == "before_optimizer_step":
            self._kill(trainer)

    def on_train_end(self, trainer, pl_module):  # noqa: ANN001
        self.replaced_by = trainer.strategy.current_experts()[self.stage]
        if self.sig != signal.SIGKILL and self.killed:
            process = next(e.process for e in trainer.strategy.membership.embedded._experts
                           if e.process.pid == self.killed["pid"])
            self.exit_code = process.wait(timeout=30)  # it left by itself once the trainer let go


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("stage,when,accumulate,step,steps,mirror_every,micro_batches", [
    ("body", "batch_start", 1, 10, 40, 10, 1),
    ("stem", "before_backward", 1, 3, 6, 1, 1),
    ("head", "before_optimizer_step", 1, 3, 6, 1, 1),
    ("body", "before_backward", 2, 3, 6, 1, 1),
    ("body", "before_backward", 1, 3, 6, 1, 2),
], ids=["forward-default-mirror", "backward", "step", "backward-accumulating", "backward-micro-batches"])
def test_a_killed_expert_is_replaced_by_a_spare_and_training_matches_plain_lightning(stage, when, accumulate, step,
                                                                                   steps, mirror_every, micro_batches):
    """SIGKILL one stage's expert at ``step``, in the forward, the backward or the optimizer step (which the trainer
    sends without waiting: the replacement replays it), when the newest snapshot is of the step before (every
    ``mirror_every`` steps; the default 10 for the kill at step 10 of 40): the trainer takes the spare, loads that
    snapshot, replays the step in flight and ends with the same losses at every step and the same parameters as
    plain Lightning; with 2 micro-batches in flight too (both find the expert gone; one replaces it)."""
    killer = KillCurrentExpert(stage, step=step, when=when)
    plain_losses, swarm_losses = Losses(), Losses()
    local, _ = fit_params(ThreeStageNet, max_steps=steps, accumulate_grad_batches=accumulate,
                          callbacks=[plain_losses])
    swarm, trainer = fit_params(
        ThreeStageNet, max_steps=steps, callbacks=[killer, swarm_losses], accumulate_grad_batches=accumulate,
        strategy=DistqatStrategy(stages=["stem", "body", "head"], spare_experts=1, mirror_every=mirror_every,
                                 micro_batches=micro_batches,
                                 swarm=SwarmConfig(request_timeout=10, failover_timeout=30)),
    )
    assert trainer.global_step == steps
    assert swarm_losses.losses == pytest.approx(plain_losses.losses, rel=1e-5)
    assert killer.killed and killer.replaced_by and killer.replaced_by["peer_id"] != killer.killed["peer_id"]
    assert killer.replaced_by["pid"] is not None and killer.replaced_by["pid"] != killer.killed["pid"]
    assert max_rel_diff(swarm.state_dict(), local.state_dict()) <= 1e-5


def test_an_expert_that_leaves_hands_its_state_over_and_no_step_is_lost():
    """SIGTERM to the 'body' expert at step 3, with no snapshot since the start: the leaving expert refuses new work
    but gives the trainer its state, so the replacement continues exactly (parity with plain Lightning); the leaver
    exits cleanly by itself once the trainer released it."""
    killer = KillCurrentExpert("body", step=3, sig=signal.SIGTERM)
    local, _ = fit_params(ThreeStageNet, max_steps=6)
    swarm, trainer = fit_params(
        ThreeStageNet, max_steps=6, callbacks=[killer],
        strategy=DistqatStrategy(stages=["stem", "body", "head"], spare_experts=1, mirror_every=0,
                                 swarm=SwarmConfig(request_timeout=10, failover_timeout=30)),
    )
    assert trainer.global_step == 6 and killer.replaced_by["peer_id"] != killer.killed["peer_id"]
    assert killer.exit_code == 0
    assert max_rel_diff(swarm.state_dict(), local.state_dict()) <= 1e-5


def test_without_a_replacement_the_trainer_stops_naming_the_stage():
    """No spare and nobody else: after ``failover_timeout`` a PipelineUnavailableError names the stage; the
    no_leaks fixture checks that nothing outlived the failure."""
    killer = KillCurrentExpert("body", step=2)
    trainer = quiet_trainer(
        max_steps=6, callbacks=[killer],
        strategy=DistqatStrategy(stages=["stem", "body", "head"],
                                 swarm=SwarmConfig(request_timeout=10, failover_timeout=3)),
    )
    started = time.monotonic()
    with pytest.raises(PipelineUnavailableError, match="stage 'body'") as info:
        trainer.fit(ThreeStageNet(), toy_loader())
    assert "no free expert" in str(info.value)
    assert time.monotonic() - started < 60


@pytest.mark.timeout(300)
def test_the_chaos_drill_reports_each_failure_and_training_goes_on():
    """`python -m lightning_distqat.chaos`: SIGKILL, SIGTERM and SIGKILL on the three stages in turn; every failure
    is recovered, the graceful one loses no step, a kill at most mirror_every - 1 steps of its stage, and training
    goes on within seconds (the killed expert's session stream ends; nothing waits out the request timeout)."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "lightning_distqat.chaos", "--steps", "18", "--every", "5", "--spares", "1",
         "--mirror-every", "2", "--width", "16", "--no-progress",
         "--request-timeout", "10"],
        capture_output=True, text=True, timeout=280, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-3000:]
    rows = [line.split() for line in out.splitlines() if line.strip().split(" ")[0].isdigit()]
    assert [(r[0], r[1], r[2]) for r in rows] == [("5", "blocks.0", "kill"), ("10", "blocks.1", "term"),
                                                  ("15", "blocks.2", "kill")], out
    assert all(int(r[3]) == 0 if r[2] == "term" else int(r[3]) <= 1 for r in rows), out
    # a dead expert's call in flight fails at once (its stream ends), not after request_timeout (10 s here): the
    # recovery (r[4]) takes well under a second on an idle machine, the next step (r[5]) follows it
    assert all(float(r[4].rstrip("s")) < 5 and float(r[5].rstrip("s")) < 10 for r in rows), out
    assert "steps trained: 18" in out and out.count("samples/s") == 2, out
