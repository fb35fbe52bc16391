"""`distqat-train`: every config group composes and instantiates, and a two-value multirun runs two jobs, each in
its own folder with its summary and its resolved config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_distqat.cli.train import _optional
from lightning_distqat.config import DataConfig, QuantConfig, SwarmConfig
from lightning_distqat.diloco.config import DiLoCoConfig

CONF = Path(__file__).resolve().parents[1] / "lightning_distqat" / "conf"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("model", _options("model"))
def test_every_model_option_instantiates_with_its_stages(model):
    with initialize_config_module("lightning_distqat.conf", version_base=None):
        cfg = compose("train", overrides=[f"model={model}"])
    module = instantiate(cfg.model)
    stages = list(getattr(module, "STAGES"))
    assert stages and all(module.get_submodule(s) is not None for s in stages)


@pytest.mark.parametrize("data", _options("data"))
def test_every_data_option_composes_and_instantiates(data):
    with initialize_config_module("lightning_distqat.conf", version_base=None):
        cfg = compose("train", overrides=[f"data={data}"])
    if OmegaConf.is_missing(cfg.data, "source"):  # presets for the user's own files name no source
        cfg.data.source = "data/my_files"
    assert isinstance(instantiate(cfg.data, _convert_="all"), DataConfig)
    assert isinstance(instantiate(cfg.swarm, _convert_="all"), SwarmConfig)


@pytest.mark.parametrize("quant", _options("quant"))
@pytest.mark.parametrize("diloco", _options("diloco"))
def test_every_quant_and_diloco_option_composes_and_instantiates(quant, diloco):
    with initialize_config_module("lightning_distqat.conf", version_base=None):
        cfg = compose("train", overrides=[f"quant={quant}", f"diloco={diloco}", "diloco.inner_steps=10"
                                          if diloco != "none" else "seed=1"])
    assert isinstance(_optional(cfg.quant), QuantConfig)
    made = _optional(cfg.diloco)
    assert made is None if diloco == "none" else isinstance(made, DiLoCoConfig) and made.inner_steps == 10


@pytest.mark.parametrize("trainer", _options("trainer"))
@pytest.mark.parametrize("logger", _options("logger"))
@pytest.mark.parametrize("strategy", _options("strategy"))
def test_every_strategy_trainer_and_logger_option_builds_a_trainer(tmp_path, monkeypatch, strategy, logger, trainer):
    """The whole build (module, datamodule, Trainer with its strategy and logger), without fitting."""
    from lightning_distqat import DistqatStrategy
    from lightning_distqat.cli.train import build

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with initialize_config_module("lightning_distqat.conf", version_base=None):
        cfg = compose("train", overrides=[f"strategy={strategy}", f"logger={logger}", f"trainer={trainer}",
                                          "model=mlp_tiny"], return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(tmp_path)
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    _, _, pl_trainer, _ = build(cfg, str(tmp_path))
    assert isinstance(pl_trainer.strategy, DistqatStrategy) == (strategy == "distqat")
    names = {"csv": "CSVLogger", "wandb": "WandbLogger", "none": None}
    assert (type(pl_trainer.logger).__name__ if pl_trainer.logger else None) == names[logger]
    if logger == "wandb":
        assert pl_trainer.logger._offline  # no API key here: offline, synced later
        assert pl_trainer.logger._wandb_init["group"] == cfg.experiment  # the monitor's run group (its default)
    assert pl_trainer.max_steps == OmegaConf.to_container(cfg.trainer)["max_steps"]


@pytest.mark.parametrize("preset", _options("preset"))
def test_every_preset_composes_and_the_readme_commands_compose(preset):
    with initialize_config_module("lightning_distqat.conf", version_base=None):
        cfg = compose("train", overrides=[f"preset={preset}"])
        assert cfg.model._target_ == "lightning_distqat.models.MLPClassifier" and cfg.data.image_size == 8
        for overrides in (["diloco=default", "diloco.inner_steps=10", "quant=int8_wire"],
                          ["initial_peers=[/ip4/127.0.0.1/tcp/1/p2p/QmX]", "strategy=local"]):
            other = compose("train", overrides=overrides)
            assert instantiate(other.swarm, _convert_="all").experiment == other.experiment


@pytest.mark.parametrize("app", ["expert", "data_server", "mirror", "monitor", "client"])
def test_the_other_roles_configs_compose(app):
    with initialize_config_module("lightning_distqat.conf", version_base=None):
        cfg = compose(app, overrides=["initial_peers=[/ip4/127.0.0.1/tcp/1/p2p/QmX]"] if app == "client" else [])
    key = {"expert": "expert", "data_server": "data", "mirror": "mirror", "monitor": "monitor", "client": "client"}[app]
    assert instantiate(cfg[key], _convert_="all") is not None


def test_the_local_config_composes_and_names_its_trainers_overrides():
    with initialize_config_module("lightning_distqat.conf", version_base=None):
        cfg = compose("local")
        assert cfg.trainers >= 1 and list(cfg.train)
        assert compose("train", overrides=list(cfg.train)).trainer.max_steps > 0


@pytest.mark.swarm
@pytest.mark.timeout(300)
def test_a_two_value_multirun_runs_two_jobs_in_their_own_folders(tmp_path):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [str(Path(sys.executable).with_name("distqat-train")), "-m", "model=mlp_tiny", "data.image_size=8",
         "trainer.max_steps=3", "trainer.max_epochs=1", "experiment=sweep-test", "seed=0,1",
         f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=280, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"], jobs
    seeds = []
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        assert summary["steps"] == 3 and summary["final_loss"] is not None
        resolved = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        seeds.append(resolved["seed"])
        assert resolved["model"]["_target_"] == "lightning_distqat.models.MLPClassifier"
    assert seeds == [0, 1]
