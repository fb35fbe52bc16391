"""``distqat-data``: the shared-memory data server of one machine (a Hydra app over ``conf/data_server.yaml``)."""

from __future__ import annotations

import logging

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_distqat.cli import serve_until_signal

__all__ = ["serve", "main"]


def serve(cfg: DictConfig) -> None:
    """Serve ``cfg.data`` (a :class:`~lightning_distqat.config.DataConfig`) until SIGINT/SIGTERM."""
    from lightning_distqat.config import DataConfig
    from lightning_distqat.data.server import DataServer

    data: DataConfig = instantiate(cfg.data, _convert_="all")
    serve_until_signal(
        lambda: DataServer(data).start(),
        lambda server: f"distqat-data: serving '{data.source}' to {data.num_trainers} trainer(s) at {server.address} "
                       "(Ctrl+C stops)",
        lambda server: server.shutdown())


@hydra.main(version_base=None, config_path="../conf", config_name="data_server")
def main(cfg: DictConfig) -> None:
    logging.getLogger("lightning_distqat").setLevel(logging.INFO)
    serve(cfg)


if __name__ == "__main__":
    main()
