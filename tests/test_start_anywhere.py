"""The embedded swarm starts wherever Lightning code runs: a Jupyter notebook, a script piped on stdin, a script
without a main guard. Each defines its own stage class, which reaches the experts by value. An expert that cannot
start fails the trainer within startup_timeout with the expert's own traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
from torch import nn

from lightning_distqat import DistqatStrategy, ExpertStartupError, SwarmConfig
from tests.helpers import ThreeStageNet, quiet_trainer, toy_loader

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
