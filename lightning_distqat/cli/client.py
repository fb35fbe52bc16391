"""``distqat-client``: the trainer host's supervisor (a Hydra app over ``conf/client.yaml``).

It joins the swarm, starts (or reuses) this machine's data server for the experiment, and keeps one ``distqat-train``
process per complete, unclaimed pipeline running, up to ``client.max_trainers``: trainer ``k`` gets the ``train``
overrides, ``trainer_id=k`` (its share of the data) and the name ``trainer-<k>`` in the fleet telemetry; its output
goes to ``logs/<experiment>/trainer-<k>.log``. Ctrl+C stops every trainer it started, then the data server.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from dataclasses import replace
from typing import Any

import hydra
from hydra import compose
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_distqat.cli import as_overrides, model_stages

__all__ = ["trainer_overrides", "serve", "main"]

log = logging.getLogger(__name__)


def _data_overrides(cfg: DictConfig) -> list[str]:
    """This host's ``data.*`` settings (those not null) as overrides of the train config."""
    values = OmegaConf.to_container(cfg.data, resolve=True) or {}
    return as_overrides("data", {k: v for k, v in values.items() if v is not None})


def trainer_overrides(cfg: DictConfig, peers: list[str], k: int, restart: bool, run_dir: str) -> list[str]:
    """The ``distqat-train`` overrides of trainer ``k``: the experiment's, this host's data settings, its share of the
    data, its name, where the swarm is. A restarted trainer keeps the weights its experts hold (no seeding)."""
    args = [*cfg.train, *_data_overrides(cfg), f"experiment={cfg.experiment}", f"initial_peers=[{','.join(peers)}]",
            f"trainer_id={k}", "embedded_data=false", f"data.name={cfg.experiment}",
            f"data.num_trainers={cfg.client.max_trainers}", f"swarm.trainer_name=trainer-{k}",
            f"hydra.run.dir={run_dir}"]
    if cfg.get("public_ip"):
        from lightning_distqat.swarm.dht import public_maddrs

        host, _ = public_maddrs(cfg.public_ip, 0)
        args.append(f"++swarm.host_maddrs=[{host[0].rsplit('/tcp/', 1)[0]}/tcp/0]")
    if restart:
        args.append("swarm.seed_experts=false")
    return args


def serve(cfg: DictConfig) -> None:
    from lightning_distqat.config import ClientConfig
    from lightning_distqat.data.client import DataClient
    from lightning_distqat.data.embedded import EmbeddedDataServer
    from lightning_distqat.data.errors import DataServerError
    from lightning_distqat.data.server import compatibility_key, default_address
    from lightning_distqat.supervisor import Supervisor, python_module
    from lightning_distqat.swarm.dht import start_dht
    from lightning_distqat.swarm.records import ExpertRecord, experts_key, read_directory, read_telemetry

    config: ClientConfig = instantiate(cfg.client, _convert_="all")
    if not config.initial_peers:
        raise SystemExit("distqat-client: give the swarm: 'initial_peers=@logs/<experiment>/initial_peers.txt' "
                         "(distqat-monitor writes it) or 'initial_peers=[<multiaddr>]'")
    train_cfg = compose("train", overrides=[*cfg.train, *_data_overrides(cfg)])
    stages = model_stages(train_cfg.model, train_cfg.stages)
    if not stages:
        raise SystemExit(f"distqat-client: {train_cfg.model._target_} has no STAGES; give them in the trainers' "
                         "config: \"train=[...,'stages=[a,b]']\"")
    data_cfg = replace(instantiate(train_cfg.data, _convert_="all"), name=config.experiment,
                       num_trainers=config.max_trainers)
    logs = os.path.join("logs", config.experiment)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    server = None
    probe = DataClient(default_address(data_cfg), 0, request_timeout=10.0)
    try:
        info = probe.connect().info()
        if info["config"] != compatibility_key(data_cfg):
            raise SystemExit(f"distqat-client: the data server at {default_address(data_cfg)} serves another "
                             "configuration; stop it or give this experiment another name")
        print(f"distqat-client: reusing the data server at {default_address(data_cfg)}", flush=True)
    except DataServerError:
        server = EmbeddedDataServer(data_cfg)
        print(f"distqat-client: starting the data server ('{data_cfg.source}', {config.max_trainers} share(s))...",
              flush=True)
        server.start()
    finally:
        probe.close()
    dht = None
    try:
        dht = start_dht(config.initial_peers, experiment=config.experiment, access_token=config.access_token)
        runs: dict[int, int] = {}

        def command(slot: Any, restart: bool) -> list[str]:
            runs[slot.index] = runs.get(slot.index, 0) + 1
            run_dir = os.path.join(logs, slot.name, f"run-{runs[slot.index]}")
            return [*python_module("lightning_distqat.cli.train"),
                    *trainer_overrides(cfg, config.initial_peers, slot.index, restart, run_dir)]

        def fleet() -> tuple[list[Any], list[Any]]:
            return (read_directory(dht, experts_key(config.experiment), ExpertRecord.from_dict),
                    read_telemetry(dht, config.experiment))

        supervisor = Supervisor(config, stages, command, fleet,
                                lambda slot: os.path.join(logs, f"{slot.name}.log"),
                                env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                                     **({"DISTQAT_ACCESS_TOKEN": config.access_token} if config.access_token else {})})
        print(f"distqat-client: experiment '{config.experiment}', stages {stages}; up to {config.max_trainers} "
              f"trainer(s), one per complete pipeline; their logs: {logs}/trainer-<k>.log (Ctrl+C stops them)",
              flush=True)
        supervisor.run(stopping, on_status=lambda line: print(f"distqat-client: {line}", flush=True))
        if supervisor.done:
            print("distqat-client: every trainer finished", flush=True)
    finally:
        if dht is not None:
            dht.shutdown()
        if server is not None:
            server.shutdown()


@hydra.main(version_base=None, config_path="../conf", config_name="client")
def main(cfg: DictConfig) -> None:
    """distqat-client: run one trainer per complete pipeline of the swarm on this host, restart crashed ones."""
    logging.getLogger("lightning_distqat").setLevel(logging.INFO)
    serve(cfg)


if __name__ == "__main__":
    sys.exit(main())
