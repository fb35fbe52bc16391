"""A data server in a child process of the trainer, for when no ``distqat-data`` runs on the machine.

The child is started with the spawn method (a clean interpreter: no trainer threads are copied), ignores Ctrl+C
(its parent shuts it down) and stops by itself when its parent dies. If it has to be killed, the parent removes the
shared-memory segments it left.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
from typing import Any, Optional

from lightning_distqat.config import DataConfig
from lightning_distqat.data.errors import DataServerError, DataSourceError
from lightning_distqat.data.shm import remove_segments_of

__all__ = ["EmbeddedDataServer"]

log = logging.getLogger(__name__)


def _serve_child(cfg: DataConfig, parent_pid: int, conn: Any) -> None:
    from lightning_distqat.data.server import DataServer
    from lightning_distqat.swarm.dht import die_with_parent

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    die_with_parent(signal.SIGTERM)
    import torch

    torch.set_num_threads(1)  # the trainer owns the cores; batches are prepared one at a time
    logging.basicConfig(level=logging.WARNING)
    server = DataServer(cfg)
    try:
        try:
            server.start()
        except Exception as e:
            conn.send(("error", type(e).__name__, str(e)))
            return
        conn.send(("ready", server.address, server.info()))
        while not stop.is_set() and os.getppid() == parent_pid:
            if conn.poll(0.5):
                try:
                    conn.recv()  # "stop"
                except EOFError:
                    pass
                break
    finally:
        server.shutdown()


class EmbeddedDataServer:
    """Start a :class:`~lightning_distqat.data.server.DataServer` for ``cfg`` in a child process."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.address: Optional[str] = None
        self.info: dict[str, Any] = {}
        self._proc: Optional[mp.process.BaseProcess] = None
        self._conn: Any = None

    def start(self) -> str:
        """Start the child and wait (``cfg.startup_timeout``) until it listens; returns its address. Errors in the
        data (missing path, bad column...) are raised here as :class:`DataSourceError`."""
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_serve_child, args=(self.cfg, os.getpid(), child_conn),
                                 name="distqat-data", daemon=True)
        self._proc.start()
        child_conn.close()
        try:
            if not self._conn.poll(self.cfg.startup_timeout):
                raise DataServerError(f"the embedded data server did not start within startup_timeout="
                                      f"{self.cfg.startup_timeout}s (loading '{self.cfg.source}')")
            reply = self._conn.recv()
        except EOFError:
            self._proc.join(timeout=5)
            code = self._proc.exitcode
            self.shutdown()
            raise DataServerError(f"the embedded data server exited while starting (exit code {code})") from None
        except BaseException:
            self.shutdown()
            raise
        if reply[0] == "error":
            self.shutdown()
            cls = DataSourceError if reply[1] == "DataSourceError" else DataServerError
            raise cls(reply[2])
        _, self.address, self.info = reply
        log.info("Data server (embedded, pid %d) serves '%s' at %s", self._proc.pid, self.cfg.source, self.address)
        return self.address

    def shutdown(self) -> None:
        """Ask the child to stop; kill it if it does not within 15 s and remove what it left in /dev/shm."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            self._conn.send("stop")
        except (OSError, ValueError):
            pass
        proc.join(timeout=15)
        if proc.exitcode is None:
            log.warning("Data server (pid %d) did not stop in 15 s; killing it", proc.pid)
            proc.kill()
            proc.join(timeout=5)
        removed = remove_segments_of(proc.pid)
        if removed:
            log.warning("Data server (pid %d) left %d shared-memory segment(s); removed", proc.pid, len(removed))
        if self.address and os.path.exists(self.address) and proc.exitcode != 0:
            os.unlink(self.address)
        self._conn.close()
