"""Ctrl+C and a killed trainer leave nothing behind: every expert, DHT process and p2pd of the run goes away."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import children_of, torch_segments_of, wait_for_line, wait_gone

pytestmark = [pytest.mark.swarm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning_distqat import DistqatStrategy
    from tests.helpers import ThreeStageNet, toy_loader

    class Announce(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                print("TRAINING", flush=True)

    if __name__ == "__main__":
        trainer = pl.Trainer(max_steps=100000, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             callbacks=[Announce()], strategy=DistqatStrategy(stages=["stem", "body", "head"]))
        trainer.fit(ThreeStageNet(), toy_loader(n=100000))
    """
)


def _start_training(tmp_path: Path) -> tuple[subprocess.Popen, set[int]]:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    process = subprocess.Popen(
        [sys.executable, str(script)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    found, seen = wait_for_line(process, lambda line: line.strip() == "TRAINING", 120)
    if not found and process.poll() is None:
        process.kill()
        pytest.fail("the trainer did not start training in 120s:\n" + "".join(seen[-40:]))
    assert process.poll() is None, "".join(seen[-40:])
    family = children_of(process.pid)
    assert len(family) >= 6, f"expected experts with DHT processes and p2pd daemons, found {family}"
    return process, family


def test_ctrl_c_stops_the_whole_swarm(tmp_path):
    process, family = _start_training(tmp_path)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert "KeyboardInterrupt" in output or "graceful shutdown" in output, output[-3000:]
    assert not wait_gone(family, 20), "processes outlived Ctrl+C"
    assert not torch_segments_of(family | {process.pid}), "shared-memory segments outlived the run"


def test_killed_trainer_takes_its_swarm_along(tmp_path):
    process, family = _start_training(tmp_path)
    process.kill()
    process.wait(timeout=10)
    left = wait_gone(family, 30)
    for pid in left:  # ours; ended so that later tests start clean
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes outlived their trainer: {sorted(left)}"
