"""The trainer host's supervisor (``distqat-client``): one ``distqat-train`` process per complete, unclaimed pipeline
in the swarm, up to a limit; a trainer that crashes is started again (with backoff, under the same trainer id, so the
data server hands it the rest of its share) and a trainer whose pipeline stays broken is stopped."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from lightning_distqat.config import ClientConfig
from lightning_distqat.swarm.records import ExpertRecord, TrainerTelemetry

__all__ = ["TrainerSlot", "Supervisor", "free_pipelines", "python_module"]

log = logging.getLogger(__name__)


def free_pipelines(records: Sequence[ExpertRecord], stages: Sequence[str]) -> int:
    """Complete pipelines that no trainer holds: for the stage with the fewest free experts, how many it has."""
    if not stages:
        return 0
    return min(sum(1 for r in records if r.stage == stage and not r.leased) for stage in stages)


@dataclass
class TrainerSlot:
    """Trainer ``k`` of this host: its process, when it (re)started, how often, and what became of it."""

    index: int
    process: Optional[subprocess.Popen] = None
    started_at: float = 0.0
    starts: int = 0
    next_start: float = 0.0
    """Not before this (monotonic) time: the backoff after a crash."""
    finished: bool = False
    """It exited 0: its training is done; it is not started again."""
    last_step: int = -1
    last_progress: float = 0.0
    """When its telemetry last showed a new step (monotonic)."""
    stale_step: int = -1
    """The step its previous process published last: until the new process publishes, that record may linger."""
    stopped_broken: int = 0
    exit_codes: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"trainer-{self.index}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    """Keeps up to ``max_trainers`` trainers running, one per complete pipeline.

    ``command(slot, restart)`` is the argv of trainer ``slot`` (``restart``: it ran before, so the experts keep the
    weights it trained); ``fleet()`` returns the expert records and trainer telemetry of the experiment;
    ``log_path(slot)`` is where the trainer's output goes.
    """

    def __init__(self, config: ClientConfig, stages: Sequence[str],
                 command: Callable[[TrainerSlot, bool], list[str]],
                 fleet: Callable[[], tuple[list[ExpertRecord], list[TrainerTelemetry]]],
                 log_path: Callable[[TrainerSlot], str], env: Optional[dict[str, str]] = None) -> None:
        self.config, self.stages = config, list(stages)
        self._command, self._fleet, self._log_path = command, fleet, log_path
        self._env = env
        self.slots = [TrainerSlot(k) for k in range(config.max_trainers)]
        self.events: list[str] = []

    # ------------------------------------------------------------------ one pass
    def tick(self, now: Optional[float] = None) -> None:
        """Look at the swarm and the trainers once: note exits, stop broken ones, start what pipelines allow."""
        now = time.monotonic() if now is None else now
        records, telemetry = self._fleet()
        seen = {t.trainer: t for t in telemetry}
        for slot in self.slots:
            self._check(slot, seen.get(slot.name), now)
        starting = sum(1 for s in self.slots if s.running and s.last_step < 0
                       and now - s.started_at < self.config.start_grace)
        available = free_pipelines(records, self.stages) - starting
        for slot in self.slots:
            if available <= 0:
                break
            if slot.finished or slot.running or now < slot.next_start:
                continue
            self._start(slot, now)
            available -= 1

    def _check(self, slot: TrainerSlot, telemetry: Optional[TrainerTelemetry], now: float) -> None:
        if slot.process is None:
            return
        code = slot.process.poll()
        if code is not None:
            slot.process = None
            slot.exit_codes.append(code)
            if code == 0:
                slot.finished = True
                self._event(f"{slot.name} finished")
            else:
                backoff = min(self.config.max_backoff, self.config.restart_backoff * 2 ** min(slot.starts - 1, 16))
                slot.next_start = now + backoff
                self._event(f"{slot.name} exited with {code}; starting it again in {backoff:.0f}s when a pipeline "
                            "is free")
            return
        fresh = telemetry is not None and (slot.last_step >= 0 or telemetry.step != slot.stale_step)
        if fresh and telemetry.step != slot.last_step:
            slot.last_step, slot.last_progress = telemetry.step, now
        since = slot.last_progress if slot.last_step >= 0 else slot.started_at
        if now - since > self.config.broken_timeout:
            self._event(f"{slot.name} made no step for {now - since:.0f}s (broken_timeout): stopping it")
            slot.stopped_broken += 1
            self._stop(slot)
            slot.next_start = now + self.config.restart_backoff

    def _start(self, slot: TrainerSlot, now: float) -> None:
        restart = slot.starts > 0
        argv = self._command(slot, restart)
        path = self._log_path(slot)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "ab") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start {slot.starts + 1}: {' '.join(argv)}\n"
                      .encode())
            out.flush()
            slot.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self._env, start_new_session=True)
        slot.starts += 1
        slot.stale_step = slot.last_step
        slot.started_at, slot.last_step, slot.last_progress = now, -1, now
        self._event(f"{slot.name} {'restarted' if restart else 'started'} (pid {slot.process.pid}, log {path})")

    def _stop(self, slot: TrainerSlot, grace: float = 30.0) -> None:
        process, slot.process = slot.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        slot.exit_codes.append(process.returncode)

    def _event(self, line: str) -> None:
        self.events.append(line)
        log.info("distqat-client: %s", line)

    # ------------------------------------------------------------------ whole runs
    @property
    def done(self) -> bool:
        """Every trainer finished its training."""
        return all(s.finished for s in self.slots)

    def status(self) -> str:
        parts = []
        for s in self.slots:
            state = ("done" if s.finished else f"step {s.last_step}" if s.running and s.last_step >= 0
                     else "starting" if s.running else "waiting")
            parts.append(f"{s.name} {state}" + (f" ({s.starts} starts)" if s.starts > 1 else ""))
        return ", ".join(parts)

    def run(self, stopping: Any, on_status: Optional[Callable[[str], None]] = None) -> None:
        """``tick()`` every ``poll`` seconds until ``stopping`` is set (or, with ``exit_when_done``, every trainer
        finished); then stop every trainer it started."""
        last = ""
        try:
            while not stopping.is_set():
                try:
                    self.tick()
                except Exception:  # noqa: BLE001 - one failed look at the swarm must not stop the trainers
                    log.warning("distqat-client: reading the swarm failed", exc_info=True)
                status = self.status()
                if on_status is not None and status != last:
                    on_status(status)
                last = status
                if self.config.exit_when_done and self.done:
                    return
                stopping.wait(self.config.poll)
        finally:
            self.stop_all()

    def stop_all(self) -> None:
        """SIGINT to every running trainer, SIGKILL to what is left after 30 s."""
        running = [s for s in self.slots if s.running]
        for slot in running:
            slot.process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 30.0
        for slot in running:
            try:
                slot.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(slot.process.pid, signal.SIGKILL)
                slot.process.wait()
            slot.process = None


def python_module(module: str) -> list[str]:
    """argv that runs ``module`` with this interpreter."""
    return [sys.executable, "-m", module]

