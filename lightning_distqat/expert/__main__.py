"""An expert started by a trainer's embedded swarm (in a fresh interpreter when it does not use the fork server):

    python -m lightning_distqat.expert --report-fd FD --parent PID

The embedded swarm normally forks its experts from a fork server that did these imports once
(``lightning_distqat/zygote.py``, which calls :func:`serve` in each fork); this entry point is the path without it.
It never imports the user's script: the stage module arrives by value on stdin (cloudpickle), so scripts without a
main guard, scripts piped on stdin and notebooks all work. The protocol, all of it local to one machine:

- stdin: one frame (``_process.frame``) holding a pickle of ``{"config": ExpertConfig fields, "sys_path": [...],
  "log_level": int, "module": cloudpickle of the stage}``, then nothing until the parent closes it: EOF asks the
  expert to stop (as SIGTERM does; the parent's death sends SIGTERM too). The stage is unpickled after the
  trainer's ``sys.path`` is in place, so classes it refers to by module (``my_project.layers.Block``) import here.
- the report pipe (``--report-fd``): one JSON line, ``{"ready": {"peer_id", "maddrs", "timings"}}`` once the expert
  serves, or ``{"error": traceback}`` if it cannot start.
- stderr (stdout too: it is pointed at stderr): the expert's log lines and prints, which the parent forwards.

The heavy imports come first, while the parent is still starting its own DHT node; the payload (which names that
node as the initial peer) is read after them.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

from lightning_distqat._process import die_with_parent, read_frame


def _stop_on_eof(fd: int, stop: Any) -> None:
    """Call ``stop()`` once ``fd`` reaches EOF (the parent closed it, or died).

    It reads the raw descriptor: a thread blocked in a buffered ``sys.stdin`` read holds that object's lock, and
    hivemind's forked processes (DHT, averager) close ``sys.stdin`` as they start, which would then wait forever."""

    def _watch() -> None:
        while os.read(fd, 65536):
            pass
        stop()

    threading.Thread(target=_watch, name="distqat-expert-stdin", daemon=True).start()


def import_expert() -> None:
    """What every expert imports before its stage arrives (torch, hivemind, the server), and torch's first optimizer
    (``warm_up``). The fork server (``lightning_distqat/zygote.py``) runs it once and forks its experts after it."""
    import cloudpickle  # noqa: F401
    import torch  # noqa: F401  (first: the stage's tensors need it)

    from lightning_distqat.expert.backend import warm_up
    from lightning_distqat.expert.server import ExpertServer  # noqa: F401

    multiprocessing.set_start_method("fork", force=True)  # hivemind's DHT and averager processes are built for fork
    warm_up()  # while the trainer starts its DHT node: the first optimizer's imports


def serve(report_fd: int, timings: dict[str, float]) -> int:
    """Read the stage from stdin and serve it until stopped, reporting on ``report_fd``; returns the exit code (1 if
    the expert could not start). Imports first unless ``timings`` says it already did (a fork of the fork server)."""
    report = os.fdopen(report_fd, "w", buffering=1)
    sent: list[str] = []

    def send(kind: str, value: Any) -> None:
        sent.append(kind)
        try:
            report.write(json.dumps({kind: value}) + "\n")
            report.flush()
        except OSError:  # the trainer is gone; nobody to tell
            pass

    os.dup2(2, 1)  # a print() in the user's stage reaches the trainer's console with the log lines
    stage = "?"
    try:
        if "imported" not in timings:
            import_expert()
            timings["imported"] = time.time()
        import cloudpickle

        from lightning_distqat._quiet import quiet_transformers
        from lightning_distqat.config import ExpertConfig
        from lightning_distqat.expert.server import ExpertServer

        blob = read_frame(sys.stdin.buffer)
        timings["received"] = time.time()
        payload = cloudpickle.loads(blob)
        config = ExpertConfig(**payload["config"])
        stage = config.stage
        logging.basicConfig(level=logging.WARNING, format=f"[expert {stage}] %(levelname)s %(name)s: %(message)s")
        logging.getLogger("lightning_distqat").setLevel(payload["log_level"])
        sys.path[:0] = [p for p in payload["sys_path"] if p not in sys.path]  # the trainer's, for its classes
        with quiet_transformers():  # a transformers stage imports transformers (and torchao) here
            module = cloudpickle.loads(payload["module"])
        timings["loaded"] = time.time()
        server = ExpertServer(config, module, on_ready=lambda info: send("ready", {
            **info, "timings": {**timings, **info["timings"]}}))
        _stop_on_eof(sys.stdin.fileno(), server.shutdown)
        server.run()
        return 0
    except BaseException:  # noqa: BLE001 - the trainer shows this traceback as the expert's own error
        error = f"expert for stage '{stage}' (pid {os.getpid()}):\n{traceback.format_exc()}"
        if "ready" in sent:  # nobody reads the report after start-up: the log forwarded to the trainer has it
            sys.stderr.write(error)
        send("error", error)
        return 1
    finally:
        report.close()


def main(argv: list[str]) -> int:
    """Serve one stage until stopped; returns the exit code (1 if the expert could not start)."""
    timings = {"started": time.time()}
    parser = argparse.ArgumentParser(prog="python -m lightning_distqat.expert", description=__doc__.splitlines()[0])
    parser.add_argument("--report-fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    die_with_parent(signal.SIGTERM)
    if os.getppid() != args.parent:
        os.close(args.report_fd)
        return 1
    return serve(args.report_fd, timings)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
