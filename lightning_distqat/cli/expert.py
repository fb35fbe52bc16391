"""``distqat-expert``: host one stage of a model (a Hydra app over ``conf/expert.yaml``)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

__all__ = ["serve", "serve_many", "main"]


def serve(cfg: DictConfig) -> None:
    """Build the model from ``cfg.model`` and serve the stage ``cfg.expert.stage`` (``auto``: the one of the model's
    stages with the fewest live experts) until SIGINT/SIGTERM. With the model's stage list known, the expert may move
    to a stage that lacks experts (``expert.rebalance``). With ``public_ip`` it listens on every interface (on
    loopback for a loopback address) and announces ``/ip4/<public_ip>/tcp/<port>``."""
    from lightning_distqat.config import ExpertConfig
    from lightning_distqat.expert.server import ExpertServer
    from lightning_distqat.swarm.dht import public_maddrs

    expert: ExpertConfig = instantiate(cfg.expert, _convert_="all")
    if cfg.get("public_ip"):
        port = int(cfg.get("port") or 0)
        host, announce = public_maddrs(cfg.public_ip, port + int(cfg.get("server_index") or 0) if port else 0)
        expert = replace(expert, host_maddrs=host, announce_maddrs=announce)
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


def serve_many(cfg: DictConfig) -> None:
    """``num_servers`` experts, one child process each (``distqat-expert`` with ``num_servers=1`` and its own output
    folder ``server-<k>``), until SIGINT/SIGTERM, which goes to every child (each hands its state over and leaves)."""
    from lightning_distqat._process import die_with_parent

    run_dir = HydraConfig.get().runtime.output_dir
    given = [o for o in HydraConfig.get().overrides.task
             if not o.startswith(("num_servers=", "server_index=", "hydra.run.dir="))]
    children = []
    for k in range(int(cfg.num_servers)):
        argv = [sys.executable, "-m", "lightning_distqat.cli.expert", *given, "num_servers=1", f"+server_index={k}",
                f"hydra.run.dir={run_dir}/server-{k}"]
        with open(os.path.join(run_dir, f"server-{k}.log"), "ab") as out:
            children.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True,
                                             preexec_fn=lambda: die_with_parent(signal.SIGTERM)))
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    print(f"distqat-expert: {len(children)} experts of '{cfg.expert.experiment}' started (pids "
          f"{', '.join(str(c.pid) for c in children)}; logs in {run_dir}/server-<k>.log; Ctrl+C stops them)",
          flush=True)
    try:
        while not stopping.wait(1.0):
            for k, child in enumerate(children):
                if child.poll() is not None and child.returncode != 0 and not getattr(child, "_told", False):
                    child._told = True  # type: ignore[attr-defined]
                    print(f"distqat-expert: server {k} exited with {child.returncode}; see "
                          f"{run_dir}/server-{k}.log", flush=True)
            if all(child.poll() is not None for child in children):
                break
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + float(cfg.expert.get("leave_timeout", 30.0)) + 15.0
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


@hydra.main(version_base=None, config_path="../conf", config_name="expert")
def main(cfg: DictConfig) -> None:
    """distqat-expert: serve stages of a model to the swarm's trainers (num_servers experts, auto-assigned)."""
    logging.getLogger("lightning_distqat").setLevel(logging.INFO)
    if int(cfg.get("num_servers") or 1) > 1:
        serve_many(cfg)
    else:
        serve(cfg)


if __name__ == "__main__":
    main()
