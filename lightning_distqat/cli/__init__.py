"""Console entry points: Hydra apps for every role."""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable

__all__ = ["serve_until_signal", "as_overrides", "model_stages"]


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


def as_overrides(prefix: str, values: dict[str, Any]) -> list[str]:
    """``values`` as Hydra command-line overrides ``++<prefix>.<key>=<value>`` (set, or add where the composed config
    lacks the key) that parse back to the same values."""
    import json

    def fmt(value: Any) -> str:
        if value is None:
            return "null"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        if isinstance(value, (list, tuple)):
            return "[" + ",".join(fmt(v) for v in value) + "]"
        if isinstance(value, dict):
            return "{" + ",".join(f"{k}:{fmt(v)}" for k, v in value.items()) + "}"
        return json.dumps(str(value))  # a quoted string: Hydra reads escapes in double quotes

    return [f"++{prefix}.{key}={fmt(value)}" for key, value in values.items() if key != "_target_"]


def model_stages(model_cfg: Any, stages: Any = None) -> list[str]:
    """The stages of the ``model`` config: ``stages`` when given, else the class's ``STAGES`` list, else (a property
    that depends on the config, as the MLP's) those of a model built from the config."""
    if stages is not None:
        return list(stages)
    from hydra.utils import get_class, instantiate

    found = getattr(get_class(model_cfg._target_), "STAGES", None)
    if not isinstance(found, (list, tuple)):
        found = getattr(instantiate(model_cfg), "STAGES", None)
    return list(found or [])
