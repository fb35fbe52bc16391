"""The embedded swarm: the experts a trainer starts on its own machine when it names no swarm to join.

Each expert is a fork of one fork server per swarm (``lightning_distqat/zygote.py``) that imported torch and
hivemind once, or, without it, a fresh interpreter (``python -m lightning_distqat.expert``); either way it runs
``expert/__main__.py``'s ``serve`` and receives its stage module by value, so the user's script is never run again:
scripts without a main guard, scripts on stdin and notebooks all work. The imports happen while the trainer starts
its own DHT node; then each expert gets its stage and the trainer's address. Each leads its own process group (its
DHT process and p2pd live in it), dies with the trainer, and forwards its log lines to the trainer's stderr.
"""

from __future__ import annotations

import json
import logging
import os
import select
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import IO, Any, Optional, Sequence

import cloudpickle
from torch import nn

from lightning_distqat._process import frame, kill_process_group
from lightning_distqat.config import ExpertConfig
from lightning_distqat.zygote import ForkServer
from lightning_distqat.zygote import available as zygote_available
from lightning_distqat.swarm.sharedwire import remove_segments_of

__all__ = ["EmbeddedSwarm", "ExpertStartupError", "STARTUP_PHASES"]

log = logging.getLogger(__name__)

STARTUP_PHASES = ("interpreter + imports", "waiting for the stage", "model load", "DHT join", "serving")
"""How an expert's start-up splits, in order (see :meth:`EmbeddedSwarm.startup_split`)."""
_MARKS = ("launched", "imported", "received", "loaded", "joined", "serving")


class ExpertStartupError(RuntimeError):
    """An embedded expert could not start. The message carries the expert's own traceback, or its last log lines
    when it died before it could send one."""


@dataclass
class _Expert:
    stage: str
    replica: int
    process: Any  # a subprocess.Popen, or a ForkedProcess with the same methods
    report: IO[str]
    launched: float
    log_tail: deque = field(default_factory=lambda: deque(maxlen=30))
    forwarder: Optional[threading.Thread] = None
    info: Optional[dict[str, Any]] = None
    stopped: threading.Event = field(default_factory=threading.Event)
    """Set once the expert has exited (and, at shutdown, its process group was killed): its log forwarder reads what
    is left and ends."""

    @property
    def name(self) -> str:
        return f"'{self.stage}'" + (f" (replica {self.replica})" if self.replica else "")

    def last_lines(self) -> str:
        return "".join(self.log_tail).rstrip() or "(it printed nothing)"


class EmbeddedSwarm:
    """Experts for ``stages`` on this machine: ``launch()`` starts them (forks of the fork server by default),
    ``start(initial_peers)`` sends each its stage (a copy of the module's current weights) and waits until all serve,
    ``shutdown()`` stops them.

    No side effects until ``launch``/``start``.
    """

    def __init__(
        self,
        stages: dict[str, nn.Module],
        *,
        expert_config: ExpertConfig,
        replicas: int = 1,
        startup_timeout: float = 120.0,
        shutdown_timeout: float = 15.0,
        fork_server: Optional[bool] = None,
    ) -> None:
        self.stages = stages
        self.expert_config = expert_config
        self.replicas = replicas
        self.startup_timeout = startup_timeout
        self.shutdown_timeout = shutdown_timeout
        self._experts: list[_Expert] = []
        self.fork_server = zygote_available() if fork_server is None else fork_server
        """Fork the experts from one interpreter that imported torch and hivemind once
        (``lightning_distqat/zygote.py``); default: where the platform allows (Linux)."""
        self._server: Optional[ForkServer] = None

    @property
    def pids(self) -> list[int]:
        """Process ids of the experts, in stage order (replicas of a stage next to each other)."""
        return [e.process.pid for e in self._experts]

    @property
    def pid_by_peer(self) -> dict[str, int]:
        """Process id of every expert that serves, by its peer id."""
        return {e.info["peer_id"]: e.process.pid for e in self._experts if e.info and "peer_id" in e.info}

    # ------------------------------------------------------------------ start
    def launch(self) -> None:
        """Start the experts; they import what an expert needs and wait for their stage. With the fork server (the
        default on Linux) one interpreter imports and forks them all; else each is its own interpreter."""
        if self._experts:
            return
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            if self.fork_server:
                self._server = ForkServer(env, spawn_timeout=self.startup_timeout)
            for stage in self.stages:
                for replica in range(self.replicas):
                    process, read_fd = self._spawn(env)
                    expert = _Expert(stage, replica, process, os.fdopen(read_fd), time.time())
                    expert.forwarder = threading.Thread(target=_forward_log, args=(expert,), daemon=True,
                                                        name=f"distqat-expert-log-{stage}-{replica}")
                    expert.forwarder.start()
                    self._experts.append(expert)
        except BaseException:
            self.shutdown()
            raise

    def _spawn(self, env: dict[str, str]) -> tuple[Any, int]:
        """One expert process (a fork of the fork server, or an interpreter of its own) and its report pipe."""
        if self._server is not None:
            return self._server.spawn()
        read_fd, write_fd = os.pipe()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "lightning_distqat.expert", "--report-fd", str(write_fd),
                 "--parent", str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                pass_fds=(write_fd,), start_new_session=True, env=env,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        return process, read_fd

    def start(self, initial_peers: list[str], trusted_peers: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Send every expert its stage and ``initial_peers``; wait until every one serves. Returns their
        ``{"stage", "peer_id", "maddrs", "timings"}``. ``trusted_peers`` (the trainer) may name any importable
        optimizer class on these experts.

        Raises :class:`ExpertStartupError` with the failing expert's traceback if one cannot start, or
        ``TimeoutError`` after ``startup_timeout`` seconds (sending the stage included); either way everything
        started is stopped first.
        """
        self.launch()
        try:
            level = logging.getLogger("lightning_distqat").getEffectiveLevel()
            blobs = {
                stage: frame(cloudpickle.dumps({
                    "config": asdict(replace(self.expert_config, stage=stage, initial_peers=list(initial_peers),
                                             trusted_peers=list(trusted_peers))),
                    "sys_path": [os.path.abspath(p) for p in sys.path], "log_level": level,
                    "module": cloudpickle.dumps(module),
                }))
                for stage, module in self.stages.items()
            }
            self._wait_ready({id(e): memoryview(blobs[e.stage]) for e in self._experts})
        except BaseException:
            self.shutdown()
            raise
        return [{"stage": e.stage, **e.info} for e in self._experts if e.info is not None]

    def _wait_ready(self, unsent: dict[int, memoryview]) -> None:
        """Write each expert its stage (non-blocking, as its pipe drains) and read its report, all under one
        deadline."""
        deadline = time.monotonic() + self.startup_timeout
        selector = selectors.DefaultSelector()
        for expert in self._experts:
            selector.register(expert.report, selectors.EVENT_READ, expert)
            os.set_blocking(expert.process.stdin.fileno(), False)
            selector.register(expert.process.stdin, selectors.EVENT_WRITE, expert)
        try:
            while any(key.events & selectors.EVENT_READ for key in selector.get_map().values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    waiting = [key.data for key in selector.get_map().values() if key.fileobj is key.data.report]
                    raise TimeoutError(
                        f"embedded swarm: the experts for {', '.join(e.name for e in waiting)} did not start within "
                        f"startup_timeout={self.startup_timeout:.0f}s (raise SwarmConfig.startup_timeout on a slow "
                        "machine). Their last lines:\n" + "\n".join(e.last_lines() for e in waiting)
                    )
                for key, events in selector.select(timeout=remaining):
                    expert: _Expert = key.data
                    if events & selectors.EVENT_WRITE:
                        if self._send(expert, unsent):
                            selector.unregister(expert.process.stdin)
                        continue
                    line = expert.report.readline()
                    selector.unregister(expert.report)
                    self._take_report(expert, line)
        finally:
            selector.close()

    @staticmethod
    def _send(expert: _Expert, unsent: dict[int, memoryview]) -> bool:
        """Write what the pipe takes of the expert's stage; True once all of it is written (or the expert died)."""
        data = unsent[id(expert)]
        try:
            written = os.write(expert.process.stdin.fileno(), data)
        except BlockingIOError:
            return False
        except BrokenPipeError:
            return True  # it died before reading; its report says why
        unsent[id(expert)] = data = data[written:]
        return not data

    def _take_report(self, expert: _Expert, line: str) -> None:
        message = json.loads(line) if line.strip() else {}
        if "ready" in message:
            expert.info = {**message["ready"], "timings": {"launched": expert.launched,
                                                           **message["ready"]["timings"]}}
            return
        if "error" in message:
            raise ExpertStartupError(f"embedded swarm: the expert for stage {expert.name} failed to start:\n"
                                     f"{message['error'].rstrip()}")
        code = expert.process.wait(timeout=10)
        expert.stopped.set()  # its last lines: what the forwarder still has to read
        if expert.forwarder is not None:
            expert.forwarder.join(1.0)
        raise ExpertStartupError(
            f"embedded swarm: the expert for stage {expert.name} exited with code {code} before it could report. "
            f"Its last lines:\n{expert.last_lines()}"
        )

    def startup_split(self) -> dict[str, float]:
        """Seconds each start-up phase took (the slowest expert per phase); the phases are :data:`STARTUP_PHASES`."""
        split = dict.fromkeys(STARTUP_PHASES, 0.0)
        for expert in self._experts:
            if expert.info is None:
                continue
            marks = expert.info["timings"]
            for phase, (a, b) in zip(STARTUP_PHASES, zip(_MARKS, _MARKS[1:])):
                if a in marks and b in marks:
                    split[phase] = max(split[phase], marks[b] - marks[a])
        return split

    # ------------------------------------------------------------------ stop
    def shutdown(self) -> None:
        """Stop every expert: SIGTERM (it leaves cleanly), wait up to ``shutdown_timeout``, then SIGKILL what is left
        of its process group (its DHT process and p2pd). Closing its stdin alone would not do: processes forked by
        this one meanwhile (hivemind's DHT node) hold copies of the pipe."""
        experts, self._experts = self._experts, []
        server, self._server = self._server, None
        if server is not None and server.unspawned():  # still importing: nothing more may be forked
            server.process.kill()
        for expert in experts:
            if expert.process.poll() is None:
                expert.process.send_signal(signal.SIGTERM)
            try:
                expert.process.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + self.shutdown_timeout
        for expert in experts:
            try:
                expert.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("expert for stage %s did not stop within %.0fs; killing it", expert.name,
                            self.shutdown_timeout)
            pid = expert.process.pid
            kill_process_group(pid)  # the expert, if still there, and its DHT process and p2pd
            try:
                expert.process.wait(5)
            except subprocess.TimeoutExpired:  # stuck in the kernel; go on with the others
                log.error("expert for stage %s (pid %s) did not die after SIGKILL", expert.name, pid)
            if pid is not None:
                remove_segments_of(pid)  # its shared-memory slots, if its resource tracker died with it
        if server is not None:
            server.close()
        for expert in experts:
            expert.stopped.set()
            if expert.forwarder is not None:
                expert.forwarder.join(5)
            expert.report.close()
            if hasattr(expert.process, "close"):
                expert.process.close()


def _forward_log(expert: _Expert) -> None:
    """Copy an expert's stderr to ours line by line (a notebook shows it under the cell), keeping the last lines for
    error messages. Ends at the pipe's end, or once the expert is stopped and nothing more comes within 0.2 s: a
    torch_shm_manager the expert started holds the pipe for a few seconds after the expert is gone.

    It reads the raw descriptor, never a buffered file object whose lock a process forked meanwhile (hivemind's
    DHT node) would inherit held."""
    fd, pending = expert.process.stderr.fileno(), b""
    poller = select.poll()  # not select(): a trainer's descriptors may be numbered past 1024
    poller.register(fd, select.POLLIN)
    while True:
        if not poller.poll(200):
            if expert.stopped.is_set():
                break
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace") + "\n"
            expert.log_tail.append(line)
            try:
                sys.stderr.write(line)
            except (OSError, ValueError):  # our stderr is closed: keep draining, so the expert never blocks
                pass
    expert.process.stderr.close()
