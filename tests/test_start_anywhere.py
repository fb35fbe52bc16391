"""The embedded swarm starts wherever Lightning code runs: a Jupyter notebook, a script piped on stdin, a script
without a main guard. Each defines its own stage class, which reaches the experts by value. An expert that cannot
start fails the trainer within startup_timeout with the expert's own traceback. The experts are forks of one fork
server by default, interpreters of their own without it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
from torch import nn

from lightning_distqat import DistqatStrategy, ExpertStartupError, SwarmConfig
from lightning_distqat.config import ExpertConfig
from lightning_distqat.swarm.embedded import EmbeddedSwarm
from tests.helpers import ThreeStageNet, quiet_trainer, toy_loader, wait_gone

pytestmark = [pytest.mark.swarm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]

# A user's own stage class and module, defined where they run (notebook cell, stdin, script top level).
USER_CODE = textwrap.dedent(
    """
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch import nn
    from lightning_distqat import DistqatStrategy


    class ScaledTanh(nn.Module):  # defined here, so it can only reach the experts by value
        def __init__(self, width):
            super().__init__()
            self.linear = nn.Linear(width, width)
            self.scale = nn.Parameter(torch.ones(width))

        def forward(self, x):
            return torch.tanh(self.linear(x)) * self.scale


    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.block = ScaledTanh(8)
            self.head = nn.Linear(8, 2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.head(self.block(x)), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)


    def train():
        torch.manual_seed(0)
        x = torch.randn(64, 8)
        y = (x[:, 0] > 0).long()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
        model = Net()
        before = model.block.scale.detach().clone()
        trainer = pl.Trainer(max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu",
                             strategy=DistqatStrategy(stages=["block", "head"], experiment="anywhere"))
        trainer.fit(model, loader)
        assert type(model.block).__name__ == "ScaledTanh", type(model.block)
        assert not torch.equal(model.block.scale.detach(), before), "the stage did not train"
        print("TRAINED", float(trainer.callback_metrics["loss"]), flush=True)
    """
)


def _run_python(args: list[str], *, script: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], input=script, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.timeout(300)
def test_a_notebook_trains_its_own_stage_class():
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(USER_CODE), nbformat.v4.new_code_cell("train()")]
    client = NotebookClient(notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    text = "".join(output.get("text", "") for output in notebook.cells[1].outputs)
    assert "TRAINED" in text, notebook.cells[1].outputs


@pytest.mark.timeout(300)
def test_a_script_on_stdin_trains_its_own_stage_class():
    result = _run_python(["-"], script=USER_CODE + '\nif __name__ == "__main__":\n    train()\n')
    assert result.returncode == 0 and "TRAINED" in result.stdout, (result.stdout + result.stderr)[-4000:]


@pytest.mark.timeout(300)
def test_a_script_without_main_guard_trains(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(USER_CODE + "\ntrain()\n")
    result = _run_python([str(script)])
    assert result.returncode == 0 and "TRAINED" in result.stdout, (result.stdout + result.stderr)[-4000:]


class _Sleeper(nn.Linear):
    """A stage whose unpickling never ends (on the expert)."""

    def __setstate__(self, state):  # noqa: ANN001
        if os.environ.get("DISTQAT_TEST_SLEEP_IN_EXPERT"):
            time.sleep(3600)
        super().__setstate__(state)


class _TwoStages(ThreeStageNet):
    """ThreeStageNet whose ``body`` is replaced by the given module."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body


def test_an_expert_that_cannot_start_fails_the_trainer_with_its_own_traceback():
    """The stage's class lives in a module that only the trainer's process has: the expert's unpickling fails, and
    the trainer's error is that expert's traceback."""
    module = types.ModuleType("only_in_the_trainer")
    exec("from torch import nn\nclass Body(nn.Linear):\n    pass\n", module.__dict__)
    sys.modules[module.__name__] = module
    try:
        model = _TwoStages(module.Body(32, 32))
        trainer = quiet_trainer(max_steps=1, strategy=DistqatStrategy(stages=["stem", "body"]))
        started = time.monotonic()
        with pytest.raises(ExpertStartupError) as info:
            trainer.fit(model, toy_loader())
        message = str(info.value)
        assert "stage 'body'" in message and "Traceback" in message, message
        assert "No module named 'only_in_the_trainer'" in message, message
        assert time.monotonic() - started < 60
    finally:
        del sys.modules[module.__name__]


def test_an_expert_that_hangs_at_start_fails_the_trainer_within_startup_timeout(monkeypatch):
    monkeypatch.setenv("DISTQAT_TEST_SLEEP_IN_EXPERT", "1")  # read by the expert, a child of this process
    model = _TwoStages(_Sleeper(32, 32))
    timeout = 20.0
    trainer = quiet_trainer(max_steps=1, strategy=DistqatStrategy(stages=["stem", "body"],
                                                                  swarm=SwarmConfig(startup_timeout=timeout)))
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"the experts for 'body' did not start within startup_timeout=20s"):
        trainer.fit(model, toy_loader())
    assert time.monotonic() - started < timeout + 30
    assert isinstance(model.body, _Sleeper), "the user's module keeps its own submodules"


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.mark.parametrize("fork_server", [True, False], ids=["fork-server", "own-interpreters"])
def test_embedded_experts_serve_report_a_kill_and_stop_with_or_without_the_fork_server(fork_server):
    """By default the experts are forks of one fork server that imported torch and hivemind once; without it each is
    an interpreter of its own. Either way they serve, a SIGKILLed one's exit code is seen and nothing is left."""
    swarm = EmbeddedSwarm({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)},
                          expert_config=ExpertConfig(experiment=f"forks-{fork_server}"), fork_server=fork_server)
    pids: list[int] = []
    try:
        infos = swarm.start([])
        assert sorted(i["stage"] for i in infos) == ["a", "b"] and all(i["peer_id"] for i in infos), infos
        pids = swarm.pids
        assert len(set(pids)) == 2 and os.getpid() not in pids
        server = swarm._server.process.pid if fork_server else os.getpid()
        assert {_parent_of(pid) for pid in pids} == {server}
        os.kill(pids[0], signal.SIGKILL)
        assert swarm._experts[0].process.wait(10) == -signal.SIGKILL
        assert swarm._experts[1].process.poll() is None
    finally:
        swarm.shutdown()
    assert wait_gone(set(pids), 10) == set()


def test_a_fork_server_that_cannot_import_fails_every_expert_with_its_traceback(tmp_path, monkeypatch):
    (tmp_path / "hivemind.py").write_text("raise ImportError('hivemind is broken here on purpose')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(ROOT)]))  # read by the fork server
    swarm = EmbeddedSwarm({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)}, expert_config=ExpertConfig(experiment="x"),
                          fork_server=True)
    started = time.monotonic()
    with pytest.raises(ExpertStartupError, match="hivemind is broken here on purpose") as info:
        swarm.start([])
    assert "expert fork server" in str(info.value) and "Traceback" in str(info.value), str(info.value)
    assert time.monotonic() - started < 60


_LOCK_PROBE = textwrap.dedent(
    """
    import os, signal, sys
    from lightning_distqat._hivemind import own_locks_after_fork
    from hivemind.utils.mpfuture import MPFuture

    def child_dies_holding_the_lock(reset):
        pid = os.fork()
        if pid == 0:
            if reset:
                own_locks_after_fork()
            MPFuture._update_lock.acquire()
            os.kill(os.getpid(), signal.SIGKILL)
        os.waitpid(pid, 0)
        got = MPFuture._update_lock.acquire(timeout=2)
        if got:
            MPFuture._update_lock.release()
        return got

    print("own", child_dies_holding_the_lock(True), "shared", child_dies_holding_the_lock(False), flush=True)
    """
)


def test_a_forked_expert_that_dies_holding_a_hivemind_lock_does_not_block_the_others():
    """Experts forked from one fork server must not share hivemind's process-wide locks (MPFuture's): one killed
    while it held one would block every other expert's DHT calls. Without ``own_locks_after_fork`` it would."""
    result = _run_python(["-c", _LOCK_PROBE], timeout=60)
    assert result.stdout.split() == ["own", "True", "shared", "False"], result.stdout + result.stderr[-3000:]
