"""``distqat-expert``: host one stage of a model (a Hydra app over ``conf/expert.yaml``)."""

from __future__ import annotations

import logging

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

__all__ = ["serve", "main"]


def serve(cfg: DictConfig) -> None:
    """Build the model from ``cfg.model``, take the submodule ``cfg.expert.stage`` and serve it until SIGINT/SIGTERM."""
    from lightning_distqat.config import ExpertConfig
    from lightning_distqat.expert.server import ExpertServer

    expert: ExpertConfig = instantiate(cfg.expert, _convert_="all")
    model = instantiate(cfg.model)
    try:
        stage = model.get_submodule(expert.stage)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise SystemExit(
            f"distqat-expert: stage '{expert.stage}' is not a submodule of {type(model).__name__}; "
            f"available: {', '.join(names[:40])}"
        ) from None
    ExpertServer(expert, stage).run()


@hydra.main(version_base=None, config_path="../conf", config_name="expert")
def main(cfg: DictConfig) -> None:
    logging.getLogger("lightning_distqat").setLevel(logging.INFO)
    serve(cfg)


if __name__ == "__main__":
    main()
