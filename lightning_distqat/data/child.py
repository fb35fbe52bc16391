"""Entry point of the embedded data server's process: ``python -m lightning_distqat.data.child CONFIG_JSON PARENT_PID``.

Prints one JSON line (``{"address"}`` or ``{"error", "message"}``), then serves until its stdin closes, its parent
dies, or SIGTERM. While it loads, SIGTERM (which its parent's death also sends) ends it at once, and its loader
process with it. It imports the data server and numpy, never torch, Lightning or hivemind (and datasets only for splits
that are transformed as served).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading

from lightning_distqat._process import die_with_parent
from lightning_distqat.config import DataConfig


def _set_on_eof(fd: int, event: threading.Event) -> None:
    def _watch() -> None:
        while os.read(fd, 4096):
            pass
        event.set()

    threading.Thread(target=_watch, name="distqat-data-stdin", daemon=True).start()


def main(cfg_json: str, parent_pid: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the trainer, which stops this server
    stop = threading.Event()
    die_with_parent(signal.SIGTERM)  # while loading, SIGTERM keeps its default: the process ends at once
    if os.getppid() != parent_pid:
        return 1
    logging.basicConfig(level=logging.WARNING, format="[data server] %(levelname)s %(name)s: %(message)s")
    from lightning_distqat.data.server import DataServer

    server = DataServer(DataConfig(**json.loads(cfg_json)))
    try:
        try:
            server.start()
        except Exception as e:
            print(json.dumps({"error": type(e).__name__, "message": str(e)}), flush=True)
            return 1
        signal.signal(signal.SIGTERM, lambda *_: stop.set())  # serving: leave cleanly
        print(json.dumps({"address": server.address}), flush=True)
        _set_on_eof(sys.stdin.fileno(), stop)  # the parent closed our stdin (or died)
        stop.wait()
        return 0
    finally:
        server.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
