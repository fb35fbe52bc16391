"""Entry point of the embedded data server's process: ``python -m lightning_distqat.data.child CONFIG_JSON PARENT_PID``.

Prints one JSON line (``{"address", "info"}`` or ``{"error", "message"}``), then serves until its stdin closes, its
parent dies, or SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import sys
import threading

from lightning_distqat.config import DataConfig


def main(cfg_json: str, parent_pid: int) -> int:
    from lightning_distqat.data.server import DataServer
    from lightning_distqat.swarm.dht import die_with_parent

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    die_with_parent(signal.SIGTERM)
    logging.basicConfig(level=logging.WARNING, format="[data server] %(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(1)  # the trainer owns the cores; batches are prepared one at a time
    server = DataServer(DataConfig(**json.loads(cfg_json)))
    try:
        try:
            server.start()
        except Exception as e:
            print(json.dumps({"error": type(e).__name__, "message": str(e)}), flush=True)
            return 1
        print(json.dumps({"address": server.address, "info": server.info()}), flush=True)
        while not stop.is_set() and os.getppid() == parent_pid:
            readable, _, _ = select.select([sys.stdin], [], [], 0.5)
            if readable and not sys.stdin.readline():  # EOF: the parent closed our stdin (or died)
                break
        return 0
    finally:
        server.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
