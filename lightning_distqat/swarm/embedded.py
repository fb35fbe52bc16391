"""The embedded swarm: one expert process per stage on this machine, started from the user's own modules and stopped
with the trainer (also on exceptions, Ctrl+C, or when the trainer dies)."""

from __future__ import annotations

import io
import logging
import multiprocessing as mp
import os
import signal
import time
from dataclasses import replace
from multiprocessing.connection import wait
from typing import Any

import torch
from torch import nn

from lightning_distqat.config import ExpertConfig
from lightning_distqat.expert.server import run_embedded_expert
from lightning_distqat.swarm.dht import kill_process_group

__all__ = ["EmbeddedSwarm", "refuse_in_spawned_child"]

log = logging.getLogger(__name__)

_MAIN_GUARD = ("put the code that builds and fits the Trainer under `if __name__ == \"__main__\":` (the embedded experts "
               "are started with multiprocessing 'spawn', which re-runs the main script's top level in each of them)")


def refuse_in_spawned_child(what: str) -> None:
    """Fail at once when the main script is being re-run by a starting child process (a script without a main
    guard), instead of starting a second swarm inside every expert."""
    if getattr(mp.current_process(), "_inheriting", False):
        raise RuntimeError(f"{what}: this script is being re-run by one of its own expert processes; {_MAIN_GUARD}")


class EmbeddedSwarm:
    """Starts one expert per stage with ``start(initial_peers)``; ``shutdown()`` stops them all.

    Each expert gets a copy of its stage module's current weights. No side effects until ``start``.
    """

    def __init__(
        self,
        stages: dict[str, nn.Module],
        *,
        expert_config: ExpertConfig,
        replicas: int = 1,
        startup_timeout: float = 120.0,
        shutdown_timeout: float = 15.0,
    ) -> None:
        self.stages = stages
        self.expert_config = expert_config
        self.replicas = replicas
        self.startup_timeout = startup_timeout
        self.shutdown_timeout = shutdown_timeout
        self.processes: list[mp.process.BaseProcess] = []
        self.experts: list[dict[str, Any]] = []

    def start(self, initial_peers: list[str]) -> list[dict[str, Any]]:
        """Start the experts and wait until every one serves. Returns their ``{"stage", "peer_id", "maddrs"}``.

        Raises ``RuntimeError`` with the failing expert's traceback if one cannot start, or ``TimeoutError`` after
        ``startup_timeout`` seconds; in both cases everything started so far is stopped first.
        """
        refuse_in_spawned_child("EmbeddedSwarm")
        ctx = mp.get_context("spawn")
        pending: dict[Any, tuple[str, mp.process.BaseProcess]] = {}
        try:
            for name, module in self.stages.items():
                blob = io.BytesIO()
                torch.save(module, blob)
                for replica in range(self.replicas):
                    config = replace(self.expert_config, stage=name, initial_peers=list(initial_peers))
                    parent_conn, child_conn = ctx.Pipe(duplex=False)
                    process = ctx.Process(
                        target=run_embedded_expert,
                        args=(config, blob.getvalue(), child_conn, logging.getLogger("lightning_distqat").getEffectiveLevel()),
                        name=f"distqat-expert-{name}-{replica}",
                    )
                    process.start()
                    child_conn.close()
                    self.processes.append(process)
                    pending[parent_conn] = (name, process)
            self._wait_ready(pending)
        except BaseException:
            self.shutdown()
            raise
        finally:
            for conn in pending:
                conn.close()
        return self.experts

    def _wait_ready(self, pending: dict[Any, tuple[str, mp.process.BaseProcess]]) -> None:
        deadline = time.monotonic() + self.startup_timeout
        waiting = dict(pending)
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                names = sorted({name for name, _ in waiting.values()})
                raise TimeoutError(
                    f"embedded swarm: experts for stages {names} did not start within {self.startup_timeout:.0f}s "
                    "(raise SwarmConfig.startup_timeout on a slow machine)"
                )
            sentinels = {process.sentinel: conn for conn, (_, process) in waiting.items()}
            for ready in wait([*waiting, *sentinels], timeout=min(remaining, 1.0)):
                conn = sentinels.get(ready, ready)
                if conn not in waiting:
                    continue
                name, process = waiting[conn]
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError):
                    process.join(1.0)
                    kind, payload = "error", (f"the process exited with code {process.exitcode} before it was ready "
                                              f"(its error is above; if it ran your script again, {_MAIN_GUARD})")
                if kind != "ready":
                    raise RuntimeError(f"embedded swarm: the expert for stage '{name}' failed to start:\n{payload}")
                self.experts.append({"stage": name, **payload})
                del waiting[conn]

    def shutdown(self) -> None:
        """Stop every expert: SIGTERM, wait up to ``shutdown_timeout``, then kill what is left of its process group."""
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                try:
                    os.kill(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + self.shutdown_timeout
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("expert %s did not stop within %.0fs; killing it", process.name, self.shutdown_timeout)
                process.kill()
            kill_process_group(process.pid)  # the expert's DHT process and p2pd live in its group
            process.join(5)
        self.processes = []
        self.experts = []

