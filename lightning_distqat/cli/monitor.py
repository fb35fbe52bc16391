"""``distqat-monitor``: the bootstrap DHT node of an experiment, ``logs/<experiment>/initial_peers.txt`` for every
other role, and the fleet's numbers to Weights & Biases and the console (a Hydra app over ``conf/monitor.yaml``)."""

from __future__ import annotations

import logging
import signal
import threading

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_distqat.cli import model_stages

__all__ = ["serve", "main"]


def serve(cfg: DictConfig) -> None:
    """Run the monitor of ``cfg.monitor`` until SIGINT/SIGTERM (or ``monitor.duration``). The stages it counts are
    ``monitor.stages``, else the ``STAGES`` of the ``model`` group's model."""
    from lightning_distqat.config import MonitorConfig
    from lightning_distqat.monitor import Monitor

    config: MonitorConfig = instantiate(cfg.monitor, _convert_="all")
    if not config.stages and cfg.get("model") is not None:
        config.stages = model_stages(cfg.model)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    monitor = Monitor(config).start()
    try:
        print(f"distqat-monitor: experiment '{config.experiment}', DHT node {monitor.dht.peer_id}; peers in "
              f"{monitor.peers_file} (other roles: 'initial_peers=@{monitor.peers_file}'); W&B "
              f"{'off' if monitor.run is None else f'run {monitor.run.id} ({monitor.run.settings.mode}) in {monitor.run.dir}'}"
              f"; a report every {config.period:g}s (Ctrl+C stops)", flush=True)
        monitor.serve(stopping)
    finally:
        monitor.shutdown()


@hydra.main(version_base=None, config_path="../conf", config_name="monitor")
def main(cfg: DictConfig) -> None:
    """distqat-monitor: start an experiment's DHT, write its initial_peers.txt, report the fleet to W&B and the
    console."""
    logging.getLogger("lightning_distqat").setLevel(logging.INFO)
    serve(cfg)


if __name__ == "__main__":
    main()
