"""Console entry points: Hydra apps for every role."""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable

__all__ = ["serve_until_signal"]


def serve_until_signal(start: Callable[[], Any], describe: Callable[[Any], str], stop: Callable[[Any], None]) -> None:
    """``start()`` a service, print ``describe(service)``, and ``stop(service)`` on SIGINT or SIGTERM."""
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    service = start()
    try:
        print(describe(service), flush=True)
        while not stopping.wait(0.5):
            pass
    finally:
        stop(service)
