"""A trainer joins a swarm of standalone `distqat-expert` processes: it claims experts by fingerprint under a lease,
seeds them with its weights, trains with plain-Lightning parity, and the experts stop cleanly on SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_distqat import DistqatStrategy, PipelineUnavailableError, SwarmConfig
from lightning_distqat.swarm.dht import start_dht
from lightning_distqat.swarm.client import SwarmClient
from lightning_distqat.swarm.records import stage_fingerprint
from tests.helpers import ThreeStageNet, fit_params, interrupt_all, max_rel_diff

pytestmark = [pytest.mark.swarm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
STAGES = ["stem", "body", "head"]


@pytest.fixture
def standalone_swarm(tmp_path):
    """A bootstrap DHT node plus one `distqat-expert` process per stage of ThreeStageNet."""
    bootstrap = start_dht()
    peers = [str(m) for m in bootstrap.get_visible_maddrs()]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = Path(sys.executable).with_name("distqat-expert")
    experts = []
    try:
        for stage in STAGES:
            experts.append(subprocess.Popen(
                [str(script), "model._target_=tests.helpers.ThreeStageNet", "~model.arch", "~model.num_classes",
                 "expert.experiment=joined", f"expert.stage={stage}", f"expert.initial_peers=[{peers[0]}]",
                 f"hydra.run.dir={tmp_path}/{stage}"],
                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            ))
        yield peers, experts
    finally:
        interrupt_all(experts)
        bootstrap.shutdown()


def test_trainer_joins_standalone_experts(standalone_swarm):
    peers, experts = standalone_swarm
    swarm = SwarmConfig(experiment="joined", initial_peers=peers, discovery_timeout=90)

    # another trainer holds every expert: ours is refused with a message that says why
    other = SwarmClient(SwarmConfig(experiment="joined", initial_peers=peers, discovery_timeout=90)).start()
    try:
        model = ThreeStageNet()
        other.claim_pipeline({s: stage_fingerprint(model.get_submodule(s)) for s in STAGES})
        busy = SwarmConfig(experiment="joined", initial_peers=peers, discovery_timeout=3)
        with pytest.raises(PipelineUnavailableError, match="leased to other trainers"):
            fit_params(ThreeStageNet, max_steps=1, strategy=DistqatStrategy(stages=STAGES, swarm=busy))
    finally:
        other.shutdown()  # releases the leases

    local, _ = fit_params(ThreeStageNet, max_steps=5)
    remote, _ = fit_params(ThreeStageNet, max_steps=5, strategy=DistqatStrategy(stages=STAGES, swarm=swarm))
    assert max_rel_diff(remote.state_dict(), local.state_dict()) <= 1e-5

    for process in experts:
        process.send_signal(signal.SIGINT)
    for process in experts:
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output[-2000:]
        assert "expert ready: stage" in output and "stopped" in output
