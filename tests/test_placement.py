"""Experts place themselves: `distqat-expert` with `stage=auto` takes the stage with the fewest experts, and when a
stage loses its last expert, exactly one unleased expert of a fuller stage moves there. Real `distqat-expert`
processes on loopback, a real DHT."""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_distqat import SwarmConfig
from lightning_distqat.swarm.client import SwarmClient
from lightning_distqat.swarm.dht import start_dht
from tests.helpers import interrupt_all

pytestmark = [pytest.mark.swarm]
ROOT = Path(__file__).resolve().parents[1]
STAGES = ("blocks.0", "blocks.1")


def _expert(tmp_path: Path, name: str, peer: str, experiment: str = "placement") -> tuple[subprocess.Popen, Path]:
    log = tmp_path / name / "expert.log"  # Hydra's job log: the expert's INFO lines
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("distqat-expert")), "model=mlp_tiny", f"expert.experiment={experiment}",
         "expert.stage=auto", "expert.heartbeat_period=1", "expert.record_ttl=4", "expert.rebalance_patience=2",
         "expert.min_stay=5", f"expert.initial_peers=[{peer}]", f"hydra.run.dir={tmp_path}/{name}"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
        stderr=(tmp_path / f"{name}.err").open("w"),
    )
    return process, log


def _text(log: Path, with_errors: bool = False) -> str:
    """The expert's job log (and with ``with_errors`` what it printed to stderr)."""
    err = log.parent.with_suffix(".err")
    return (log.read_text() if log.exists() else "") + (err.read_text() if with_errors and err.exists() else "")


def _counts(client: SwarmClient) -> dict[str, list[str]]:
    by_stage: dict[str, list[str]] = collections.defaultdict(list)
    for record in client.directory():
        by_stage[record.stage].append(record.peer_id)
    return {stage: sorted(by_stage.get(stage, [])) for stage in STAGES}


def _wait_for(client: SwarmClient, condition, timeout: float, what: str,  # noqa: ANN001
              experts: list = ()) -> dict[str, list[str]]:
    deadline = time.monotonic() + timeout
    counts = _counts(client)
    while not condition(counts):
        failed = [_text(log, with_errors=True)[-3000:] for process, log in experts if process.poll() not in (None, -9)]
        if time.monotonic() > deadline or failed:
            raise AssertionError(f"{what} within {timeout:.0f}s; the directory says {counts}; {failed}")
        time.sleep(0.5)
        counts = _counts(client)
    return counts


def _stays(client: SwarmClient, counts: dict[str, list[str]], seconds: float, experts: list) -> None:
    """For ``seconds`` no expert moves (none logs a move it did not log before), and the directory still says
    ``counts`` at the end."""
    before = [_text(log).count("moved from stage") for _, log in experts]
    time.sleep(seconds)
    assert [_text(log).count("moved from stage") for _, log in experts] == before, "an expert moved in a stable swarm"
    _wait_for(client, lambda c: c == counts, 10, "the directory changed", experts)


@pytest.mark.timeout(300)
def test_auto_assigned_experts_spread_and_one_moves_to_fill_a_gap(tmp_path):
    bootstrap = start_dht()
    peer = str(bootstrap.get_visible_maddrs()[0])
    client = SwarmClient(SwarmConfig(experiment="placement", initial_peers=[peer])).start()
    experts: list[tuple[subprocess.Popen, Path]] = []
    try:
        for i in range(3):  # one after the other: each sees the ones before it
            experts.append(_expert(tmp_path, f"e{i}", peer))
            _wait_for(client, lambda c, n=i + 1: sum(map(len, c.values())) == n, 90, f"expert {i} did not announce",
                      experts)
        counts = _wait_for(client, lambda c: sorted(map(len, c.values())) == [1, 2], 30, "no 2-1 split", experts)
        _stays(client, counts, 10, experts)  # a stable swarm: 10 checks per expert (3 x the patience), nobody moves
        lone_stage = next(s for s, peers in counts.items() if len(peers) == 1)
        full_stage = next(s for s in STAGES if s != lone_stage)
        pid_of = {}
        for process, log in experts:
            text = _text(log)
            pid_of[next(p for peers in counts.values() for p in peers if p in text)] = process
        victim = pid_of[counts[lone_stage][0]]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        # the gap closes: one of the two experts of the full stage moves (after its record expired and 2 checks)
        after = _wait_for(client, lambda c: all(len(c[s]) == 1 for s in STAGES), 60, "nobody filled the gap",
                          experts)
        assert after[lone_stage][0] in counts[full_stage]
        _stays(client, after, 10, experts)  # and nobody flaps back: 20 s of stable swarm in all
        moved = [log for process, log in experts if "moved from stage" in _text(log)]
        assert len(moved) == 1, [_text(log)[-2000:] for _, log in experts]
    finally:
        interrupt_all([process for process, _ in experts])
        client.shutdown()
        bootstrap.shutdown()


def _peer_of(log: Path, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"as peer (\S+) on", _text(log))
        if match:
            return match.group(1)
        time.sleep(0.2)
    raise AssertionError(f"the expert did not start: {_text(log, with_errors=True)[-3000:]}")


def _mlp_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 192, generator=g)
    return DataLoader(TensorDataset(x, (x[:, :10]).argmax(-1)), batch_size=8)


class _KillAndStartAnother(Callback):
    """At ``step``: SIGKILL the expert of ``stage`` (the only one) and start a `distqat-expert expert.stage=auto`."""

    def __init__(self, step: int, stage: str, experts: dict, start) -> None:  # noqa: ANN001
        self.step, self.stage, self.experts, self.start = step, stage, experts, start
        self.started: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        if trainer.global_step != self.step or self.started:
            return
        trainer.strategy.pipeline.wait_for_snapshot()
        victim = self.experts[trainer.strategy.current_experts()[self.stage]["peer_id"]]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        self.started = dict(zip(("process", "log"), self.start()))

    def on_train_end(self, trainer, pl_module):  # noqa: ANN001
        self.failovers = list(trainer.strategy.pipeline.failovers)


@pytest.mark.timeout(300)
def test_an_auto_expert_started_after_a_kill_takes_the_empty_stage_and_training_resumes_exactly(tmp_path):
    """The only expert of 'blocks.1' dies at step 4 (no spare); a `distqat-expert expert.stage=auto` started then
    takes that stage (it has none), the trainer claims it, loads its snapshot of step 4 and replays: the run ends
    with plain Lightning's parameters."""
    from lightning_distqat import DistqatStrategy
    from lightning_distqat.models import MLPClassifier
    from tests.helpers import fit_params, max_rel_diff

    bootstrap = start_dht()
    peer = str(bootstrap.get_visible_maddrs()[0])
    running: list[tuple[subprocess.Popen, Path]] = []
    try:
        for i in range(2):
            running.append(_expert(tmp_path, f"e{i}", peer, "resume"))
            _peer_of(running[-1][1])
        by_peer = {_peer_of(log): process for process, log in running}

        def start_another():  # noqa: ANN202
            running.append(_expert(tmp_path, "late", peer, "resume"))
            return running[-1]

        killer = _KillAndStartAnother(4, "blocks.1", by_peer, start_another)
        make = lambda: MLPClassifier(in_features=192, width=32, depth=2, num_classes=10)  # noqa: E731 - mlp_tiny
        local, _ = fit_params(make, _mlp_loader, max_steps=10)
        swarm, trainer = fit_params(
            make, _mlp_loader, max_steps=10, callbacks=[killer],
            strategy=DistqatStrategy(stages=list(STAGES), initial_peers=[peer], experiment="resume", mirror_every=1,
                                     swarm=SwarmConfig(request_timeout=10, failover_timeout=120)),
        )
        assert trainer.global_step == 10
        (failover,) = killer.failovers
        assert failover["stage"] == "blocks.1" and failover["new"] == _peer_of(killer.started["log"])
        assert failover["steps_lost"] == 0 and "snapshot of step 4" in failover["source"]
        assert "takes stage 'blocks.1'" in _text(killer.started["log"])
        assert max_rel_diff(swarm.state_dict(), local.state_dict()) <= 1e-5
    finally:
        interrupt_all([process for process, _ in running])
        bootstrap.shutdown()
