"""``distqat-local``: the whole cast of an experiment on one machine (a Hydra app over ``conf/local.yaml``).

In order: ``distqat-monitor`` (the DHT and ``initial_peers.txt``), ``distqat-data`` (the data server), one
``distqat-expert`` per stage and trainer plus ``spares`` per stage, and ``distqat-client``, which runs the trainers
and exits when they finished. Each role writes ``logs/<experiment>/<role>.log``; a status line per role is printed
every ``status_period`` seconds; Ctrl+C (or the end of training) stops the roles in reverse order.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

import hydra
from hydra import compose
from omegaconf import DictConfig, OmegaConf

from lightning_distqat.cli import as_overrides, model_stages

__all__ = ["Role", "run_local", "main"]


@dataclass
class Role:
    """One process of the cast and its log file."""

    name: str
    argv: list[str]
    log: str
    process: Optional[subprocess.Popen] = None

    def start(self, env: dict[str, str]) -> "Role":
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, start_new_session=True)
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def last_line(self, prefix: str = "") -> str:
        """The last line of its log that starts with ``prefix`` (reads the file's tail)."""
        try:
            with open(self.log, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log) - 16384))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        return next((line.strip() for line in reversed(lines) if line.strip().startswith(prefix)), "")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60.0) -> None:
        if not self.alive:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _wait(role: Role, ready: "callable", timeout: float, stopping: threading.Event) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if not role.alive:
            raise SystemExit(f"distqat-local: {role.name} exited with {role.process.returncode}; see {role.log}")
        if time.monotonic() > deadline:
            raise SystemExit(f"distqat-local: {role.name} did not come up within {timeout:.0f}s; see {role.log}")
        if stopping.wait(0.2):
            raise KeyboardInterrupt


def run_local(cfg: DictConfig, stopping: threading.Event) -> int:
    """Start the cast, print status lines until the client exits or ``stopping`` is set, stop everything; returns
    the client's exit code (0: every trainer finished)."""
    experiment = cfg.experiment
    logs = os.path.join("logs", experiment)
    os.makedirs(logs, exist_ok=True)
    train_cfg = compose("train", overrides=list(cfg.train), return_hydra_config=True)
    stages = model_stages(train_cfg.model, train_cfg.stages)
    model = [f"model={train_cfg.hydra.runtime.choices['model']}",
             *as_overrides("model", OmegaConf.to_container(train_cfg.model, resolve=True))]
    data = OmegaConf.to_container(train_cfg.data, resolve=True)
    data.update(name=experiment, num_trainers=int(cfg.trainers))
    peers_file = os.path.join(logs, "initial_peers.txt")
    if os.path.exists(peers_file):
        os.remove(peers_file)
    py = [sys.executable, "-m"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    roles: list[Role] = []
    code = 1
    try:
        monitor = Role("monitor", [*py, "lightning_distqat.cli.monitor", f"experiment={experiment}",
                                   f"monitor.stages=[{','.join(stages)}]", f"monitor.wandb={str(cfg.wandb).lower()}",
                                   "monitor.console=false", "monitor.period=5",
                                   f"hydra.run.dir={logs}/monitor"], os.path.join(logs, "monitor.log")).start(env)
        roles.append(monitor)
        _wait(monitor, lambda: os.path.exists(peers_file), cfg.startup_timeout, stopping)
        peers = f"initial_peers=@{peers_file}"
        data_role = Role("data", [*py, "lightning_distqat.cli.data", *as_overrides("data", data),
                                  f"hydra.run.dir={logs}/data"], os.path.join(logs, "data.log")).start(env)
        roles.append(data_role)
        _wait(data_role, lambda: "distqat-data: serving" in data_role.last_line("distqat-data:"),
              cfg.startup_timeout, stopping)
        experts = []
        for stage in stages:
            for k in range(int(cfg.trainers) + int(cfg.spares)):
                name = f"expert-{stage}-{k}"
                experts.append(Role(name, [*py, "lightning_distqat.cli.expert", *model, f"experiment={experiment}", peers,
                                           f"expert.stage={stage}", f"hydra.run.dir={logs}/{name}"],
                                    os.path.join(logs, f"{name}.log")).start(env))
        roles += experts
        client = Role("client", [*py, "lightning_distqat.cli.client", f"experiment={experiment}", peers,
                                 "train=[" + ",".join(f"'{o}'" for o in cfg.train) + "]",
                                 f"client.max_trainers={int(cfg.trainers)}", "client.exit_when_done=true",
                                 f"hydra.run.dir={logs}/client"], os.path.join(logs, "client.log")).start(env)
        roles.append(client)
        print(f"distqat-local: '{experiment}': monitor, data server, {len(experts)} experts "
              f"({int(cfg.trainers) + int(cfg.spares)} per stage of {stages}) and the client with {cfg.trainers} "
              f"trainer(s) started; logs in {logs}/ (Ctrl+C stops them all)", flush=True)
        while client.alive:
            if stopping.wait(cfg.status_period):
                break
            up = sum(e.alive for e in experts)
            print(f"distqat-local: monitor {'up' if monitor.alive else 'DOWN'} | data "
                  f"{'up' if data_role.alive else 'DOWN'} | experts {up}/{len(experts)} up | "
                  f"{client.last_line('distqat-client:').removeprefix('distqat-client: ') or 'client starting'}",
                  flush=True)
        if not client.alive:
            code = client.process.returncode
            print(f"distqat-local: the client exited with {code} "
                  f"({'every trainer finished' if code == 0 else f'see {client.log}'})", flush=True)
    finally:
        for role in reversed(roles):  # client (and its trainers) first, the monitor last
            role.stop(signal.SIGINT if role.name in ("client", "monitor", "data") else signal.SIGTERM)
        print("distqat-local: every role stopped", flush=True)
    return code


@hydra.main(version_base=None, config_path="../conf", config_name="local")
def main(cfg: DictConfig) -> None:
    """distqat-local: run the whole cast of an experiment (monitor, data, experts, client, trainers) on this
    machine."""
    logging.getLogger("lightning_distqat").setLevel(logging.INFO)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        code = run_local(cfg, stopping)
    except KeyboardInterrupt:
        code = 130
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
