"""``distqat-mirror``: the parameter mirror of an experiment (a Hydra app over ``conf/mirror.yaml``)."""

from __future__ import annotations

import logging

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_distqat.cli import serve_until_signal

__all__ = ["serve", "main"]


def serve(cfg: DictConfig) -> None:
    """Run the mirror of ``cfg.mirror`` (a :class:`~lightning_distqat.config.MirrorConfig`) until SIGINT/SIGTERM."""
    from lightning_distqat.config import MirrorConfig
    from lightning_distqat.mirror import ParameterMirror

    config: MirrorConfig = instantiate(cfg.mirror, _convert_="all")
    serve_until_signal(
        lambda: ParameterMirror(config).start(),
        lambda mirror: f"distqat-mirror: peer {mirror.peer_id} mirrors experiment '{config.experiment}' every "
                       f"{config.refresh_every:g}s into {config.checkpoint_dir} (experts let it read their state with "
                       f"'expert.mirror_peers=[{mirror.peer_id}]'; Ctrl+C stops)",
        lambda mirror: mirror.shutdown())


@hydra.main(version_base=None, config_path="../conf", config_name="mirror")
def main(cfg: DictConfig) -> None:
    logging.getLogger("lightning_distqat").setLevel(logging.INFO)
    serve(cfg)


if __name__ == "__main__":
    main()
