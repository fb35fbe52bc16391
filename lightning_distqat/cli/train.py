"""``distqat-train``: train a LightningModule through the swarm from config (a Hydra app over ``conf/train.yaml``).

Composes the groups ``model``, ``data`` (the shared-memory data server), ``strategy`` (``distqat``, or ``local``: the
same training in this process, the baseline), ``quant``, ``diloco``, ``trainer``, ``logger`` (csv, wandb, none) and
``preset`` (whole experiments), builds the module, the datamodule and a Lightning ``Trainer`` with
:class:`~lightning_distqat.DistqatStrategy`, trains, prints the closing summary and writes it to ``summary.json`` in
the job's folder (with Hydra's resolved config in ``.hydra/``). Multirun (``-m``) runs one job per combination, each
in its own folder.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

__all__ = ["build", "train", "main"]


def _optional(node: Any, **kwargs: Any) -> Optional[Any]:
    """A config group that may be switched off: an option without a ``_target_`` (``diloco: none``) is None."""
    if node is None or (isinstance(node, DictConfig) and node.get("_target_") is None):
        return None
    return instantiate(node, _convert_="all", **kwargs)


def _logger(cfg: DictConfig) -> Any:
    """The ``logger`` group's logger; W&B runs offline unless an API key is configured (or ``logger.offline``)."""
    node = cfg.logger
    if node is not None and str(node.get("_target_", "")).endswith("WandbLogger") and node.get("offline") is None:
        from lightning_distqat.monitor import wandb_mode

        os.environ.setdefault("WANDB_SILENT", "true")
        return _optional(node, offline=wandb_mode(None) != "online")
    return _optional(node)


def build(cfg: DictConfig, output_dir: str) -> tuple[Any, Any, Any, Any]:
    """The module, the datamodule, the Trainer and its summary callback that ``cfg`` describes."""
    import lightning.pytorch as pl

    from lightning_distqat import SharedMemoryDataModule
    from lightning_distqat.callbacks import TrainingSummary

    pl.seed_everything(cfg.seed, verbose=False)
    model = instantiate(cfg.model)
    data = SharedMemoryDataModule(instantiate(cfg.data, _convert_="all"), trainer_id=cfg.get("trainer_id"),
                                  embedded=cfg.get("embedded_data", True))
    if cfg.strategy.get("_target_") is None:  # strategy=local: the baseline, no swarm
        strategy: Any = "auto"
    else:
        stages = list(cfg.stages) if cfg.stages is not None else list(getattr(model, "STAGES", []))
        if not stages:
            raise SystemExit(f"distqat-train: {type(model).__name__} has no STAGES; give them: 'stages=[a,b]'")
        make = instantiate(cfg.strategy, _partial_=True, _convert_="all")  # built objects go in as they are
        strategy = make(stages=stages, swarm=instantiate(cfg.swarm, _convert_="all"), quant=_optional(cfg.quant),
                        diloco=_optional(cfg.diloco))
    summary = TrainingSummary()
    trainer = pl.Trainer(strategy=strategy, logger=_logger(cfg) or False, callbacks=[summary],
                         **OmegaConf.to_container(cfg.trainer, resolve=True))
    return model, data, trainer, summary


def train(cfg: DictConfig, output_dir: str) -> dict[str, Any]:
    """Build and fit; returns the summary (also written to ``output_dir/summary.json``)."""
    model, data, trainer, summary = build(cfg, output_dir)
    trainer.fit(model, datamodule=data)
    result = dict(summary.summary)
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(result, f, indent=2)
    first, final = result.get("first_loss"), result.get("final_loss")
    if cfg.require_progress and first is not None and final is not None and final >= first:
        raise SystemExit(f"distqat-train: the training loss did not go down ({first:.4f} -> {final:.4f})")
    return result


@hydra.main(version_base=None, config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    """distqat-train: train a LightningModule through the swarm (or locally: strategy=local) from config."""
    logging.getLogger("lightning_distqat").setLevel(logging.INFO)
    import lightning.pytorch  # noqa: F401 - Lightning adds its console handler (to "lightning") on import

    lightning_log = logging.getLogger("lightning")
    if lightning_log.handlers:  # Lightning prints its own lines; without this Hydra's root handler prints them again
        lightning_log.propagate = False
    train(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
