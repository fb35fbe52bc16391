"""A data server in a child process of the trainer, for when no ``distqat-data`` runs on the machine.

The child is a fresh interpreter (``python -m lightning_distqat.data.child``): no trainer threads are copied and
the user's script is not imported again, so scripts without an ``if __name__ == "__main__"`` guard work too. It has
its own resource tracker (which unlinks its shared memory if it is killed), ignores Ctrl+C (its parent shuts it down)
and stops by itself when its parent dies or closes its stdin.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
from dataclasses import asdict
from typing import Optional

from lightning_distqat.config import DataConfig
from lightning_distqat.data.errors import DataServerError, DataSourceError
from lightning_distqat.data.shm import remove_segments_of

__all__ = ["EmbeddedDataServer"]

log = logging.getLogger(__name__)


class EmbeddedDataServer:
    """Start a :class:`~lightning_distqat.data.server.DataServer` for ``cfg`` in a child process."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.address: Optional[str] = None
        self._proc: Optional[subprocess.Popen] = None

    @property
    def pid(self) -> Optional[int]:
        """The server process's id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> str:
        """Start the child and wait (``cfg.startup_timeout``) until it listens; returns its address. Errors in the
        data (missing path, bad column...) are raised here as :class:`DataSourceError`."""
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "lightning_distqat.data.child", json.dumps(asdict(self.cfg)), str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
        )
        try:
            ready, _, _ = select.select([self._proc.stdout], [], [], self.cfg.startup_timeout)
            line = self._proc.stdout.readline() if ready else None
        except BaseException:
            self.shutdown()
            raise
        if line is None:
            self.shutdown()
            raise DataServerError(f"the embedded data server did not start within startup_timeout="
                                  f"{self.cfg.startup_timeout}s (loading '{self.cfg.source}')")
        if not line:
            code = self._proc.wait(timeout=10)
            self.shutdown()
            raise DataServerError(f"the embedded data server exited while starting (exit code {code}); see its "
                                  f"messages above")
        reply = json.loads(line)
        if "error" in reply:
            self.shutdown()
            cls = DataSourceError if reply["error"] == "DataSourceError" else DataServerError
            raise cls(reply["message"])
        self.address = reply["address"]
        log.info("Data server (embedded, pid %d) serves '%s' at %s", self._proc.pid, self.cfg.source, self.address)
        return self.address

    def shutdown(self) -> None:
        """Ask the child to stop (close its stdin, SIGTERM: a child still loading ends at once, with its loader);
        kill it if it does not stop within 15 s, and remove the segments it left."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
        except OSError:
            pass
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            log.warning("Data server (pid %d) did not stop in 15 s; killing it", proc.pid)
            proc.kill()
            proc.wait(timeout=5)
        proc.stdout.close()
        removed = remove_segments_of(proc.pid)
        if removed:
            log.warning("Data server (pid %d) left %d shared-memory segment(s); removed", proc.pid, len(removed))
        if proc.returncode != 0 and self.address and os.path.exists(self.address):
            os.unlink(self.address)
