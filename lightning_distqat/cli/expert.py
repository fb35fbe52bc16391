"""``distqat-expert``: host one stage of a model (a Hydra app over ``conf/expert.yaml``)."""

from __future__ import annotations

import logging
from dataclasses import replace

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

__all__ = ["serve", "main"]


def serve(cfg: DictConfig) -> None:
    """Build the model from ``cfg.model`` and serve the stage ``cfg.expert.stage`` (``auto``: the one of the model's
    stages with the fewest live experts) until SIGINT/SIGTERM. With the model's stage list known, the expert may move
    to a stage that lacks experts (``expert.rebalance``)."""
    from lightning_distqat.config import ExpertConfig
    from lightning_distqat.expert.server import ExpertServer

    expert: ExpertConfig = instantiate(cfg.expert, _convert_="all")
    model = instantiate(cfg.model)
    stages = list(expert.stages or getattr(model, "STAGES", None) or [])
    if expert.stage == "auto" and not stages:
        raise SystemExit(f"distqat-expert: stage=auto needs the stages of {type(model).__name__}; it has no STAGES, "
                         "so list them: 'expert.stages=[a,b,...]'")
    if expert.stage != "auto":
        try:
            model.get_submodule(expert.stage)
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n]
            raise SystemExit(
                f"distqat-expert: stage '{expert.stage}' is not a submodule of {type(model).__name__}; "
                f"available: {', '.join(names[:40])}"
            ) from None
    if stages:
        ExpertServer(replace(expert, stages=stages), model=model).run()
    else:
        ExpertServer(expert, model.get_submodule(expert.stage)).run()


@hydra.main(version_base=None, config_path="../conf", config_name="expert")
def main(cfg: DictConfig) -> None:
    logging.getLogger("lightning_distqat").setLevel(logging.INFO)
    serve(cfg)


if __name__ == "__main__":
    main()
