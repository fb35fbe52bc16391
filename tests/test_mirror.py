"""The parameter mirror: it pulls every stage's state from experts that trust it, writes checkpoints atomically and
keeps the last k, and a whole swarm restarts from them (a new mirror with the same identity loads the newest
checkpoint; new `distqat-expert` processes warm-start their stages from it). Real processes on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_distqat import DistqatStrategy, SwarmConfig
from lightning_distqat.config import MirrorConfig
from lightning_distqat.mirror import ParameterMirror, latest_checkpoint
from lightning_distqat.models import MLPClassifier
from lightning_distqat.swarm.client import SwarmClient
from lightning_distqat.swarm.dht import start_dht
from lightning_distqat.swarm.records import stage_fingerprint
from tests.helpers import fit_params, interrupt_all, max_rel_diff
from tests.test_placement import _mlp_loader, _peer_of, _text

pytestmark = [pytest.mark.swarm]
ROOT = Path(__file__).resolve().parents[1]
STAGES = ["blocks.0", "blocks.1"]


def _expert(tmp_path: Path, name: str, peer: str, mirror: str) -> tuple[subprocess.Popen, Path]:
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("distqat-expert")), "model=mlp_tiny", "expert.experiment=mirrored",
         "expert.heartbeat_period=1", "expert.record_ttl=4", f"expert.initial_peers=[{peer}]",
         f"expert.mirror_peers=[{mirror}]", f"hydra.run.dir={tmp_path}/{name}"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
        stderr=(tmp_path / f"{name}.err").open("w"),
    )
    return process, tmp_path / name / "expert.log"


def _make() -> MLPClassifier:
    return MLPClassifier(in_features=192, width=32, depth=2, num_classes=10)  # conf/model/mlp_tiny.yaml


@pytest.mark.timeout(300)
def test_the_mirror_checkpoints_the_swarm_and_a_new_swarm_restarts_from_it(tmp_path):
    bootstrap = start_dht()
    peer = str(bootstrap.get_visible_maddrs()[0])
    config = MirrorConfig(experiment="mirrored", initial_peers=[peer], checkpoint_dir=str(tmp_path / "ckpt"),
                          refresh_every=1.0, keep=2, identity_path=str(tmp_path / "mirror.key"))
    mirror = ParameterMirror(config).start()
    experts, client = [], None
    try:
        for i in range(2):
            experts.append(_expert(tmp_path, f"a{i}", peer, mirror.peer_id))
            _peer_of(experts[-1][1])
        trained, _ = fit_params(_make, _mlp_loader, max_steps=6, strategy=DistqatStrategy(
            stages=STAGES, initial_peers=[peer], experiment="mirrored", swarm=SwarmConfig(request_timeout=20)))
        fitted = time.time()
        deadline = time.monotonic() + 30  # a checkpoint from a pull after the last step
        while not ((path := latest_checkpoint(config.checkpoint_dir)) and float(Path(path).stem[7:]) > fitted + 0.1):
            assert time.monotonic() < deadline, "the mirror wrote no checkpoint after training"
            time.sleep(0.2)
        files = sorted(os.listdir(config.checkpoint_dir))
        assert 1 <= len(files) <= 2 and not any(f.endswith(".tmp") for f in files), files
        newest = latest_checkpoint(config.checkpoint_dir)
        expected = {k: v for k, v in trained.state_dict().items() if k.startswith("blocks.")}
        interrupt_all([process for process, _ in experts])
        mirror.shutdown()

        # the whole swarm again, from the checkpoint: the same mirror identity, new experts
        mirror = ParameterMirror(config).start()
        assert set(mirror.stages) == set(STAGES), newest
        loaded = {f"{stage}.{k}": v for stage in STAGES for k, v in mirror.stages[stage]["state"]["module"].items()}
        assert max_rel_diff(loaded, expected) == 0.0, "the checkpoint does not hold the trained weights"
        experts = []
        for i in range(2):
            experts.append(_expert(tmp_path, f"b{i}", peer, mirror.peer_id))
            _peer_of(experts[-1][1])
        assert all("warm-started" in _text(log) for _, log in experts), [_text(log) for _, log in experts]
        client = SwarmClient(SwarmConfig(experiment="mirrored", initial_peers=[peer])).start()
        model = _make()
        handles = client.claim_pipeline({s: stage_fingerprint(model.get_submodule(s)) for s in STAGES})
        restored = {f"{s}.{k}": v for s, h in handles.items() for k, v in h.get_state()["module"].items()}
        assert max_rel_diff(restored, expected) == 0.0, "the new experts did not start from the checkpoint"
    finally:
        if client is not None:
            client.shutdown()
        interrupt_all([process for process, _ in experts])
        mirror.shutdown()
        bootstrap.shutdown()
