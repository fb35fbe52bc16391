"""DHT lifecycle: starting a hivemind DHT node that cannot outlive its owner, and an event-loop thread to drive
hivemind's async P2P API from synchronous code (autograd, Lightning hooks)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Coroutine, Optional, Sequence, TypeVar

import hivemind
from hivemind.p2p import P2PDaemonError

from lightning_distqat._process import die_with_parent, exit_with_parent, remove_wire_slots, terminate_children
from lightning_distqat.swarm.auth import AccessToken
from lightning_distqat.swarm.records import record_validators

__all__ = ["start_dht", "public_maddrs", "AsyncRunner"]

log = logging.getLogger(__name__)
T = TypeVar("T")

class _OwnedDHT(hivemind.DHT):
    """A hivemind DHT whose background process (and its p2pd) ends when the process that started it dies,
    even by SIGKILL, instead of lingering as an orphan."""

    def run(self) -> None:
        die_with_parent(signal.SIGTERM)

        def _on_term(signum: int, frame: Any) -> None:
            terminate_children(signal.SIGTERM)  # p2pd
            if os.getppid() != self._parent_pid:  # the owner died (its death sent this): what the watchdog does
                remove_wire_slots(self._parent_pid)  # the shared-memory slots a killed owner could not unlink
            os._exit(0)

        signal.signal(signal.SIGTERM, _on_term)
        if os.getppid() != self._parent_pid:  # the owner died before we installed the handler
            _on_term(signal.SIGTERM, None)
        exit_with_parent(self._parent_pid)
        super().run()


def public_maddrs(public_ip: Optional[str], port: int = 0) -> tuple[list[str], list[str]]:
    """Listen and announce multiaddrs of a node that other machines reach at ``public_ip``: it listens on ``port``
    (0: a free one, picked now) of every interface (of loopback only, for a loopback ``public_ip``) and announces
    ``/ip4/<public_ip>/tcp/<port>``. Without a public IP: loopback on a free port, nothing announced."""
    if public_ip is None:
        return ["/ip4/127.0.0.1/tcp/0"], []
    try:
        ip = ipaddress.ip_address(public_ip)
    except ValueError:
        raise ValueError(f"public_ip {public_ip!r} is not an IP address; give the address other machines reach this "
                         "one at, e.g. public_ip=203.0.113.7") from None
    proto = "ip4" if ip.version == 4 else "ip6"
    listen = str(ip) if ip.is_loopback else ("0.0.0.0" if ip.version == 4 else "::")
    if not port:
        with socket.socket(socket.AF_INET if ip.version == 4 else socket.AF_INET6) as s:
            s.bind((listen, 0))
            port = s.getsockname()[1]
    return [f"/{proto}/{listen}/tcp/{port}"], [f"/{proto}/{ip}/tcp/{port}"]


def start_dht(
    initial_peers: Optional[Sequence[str]] = None,
    *,
    host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
    experiment: Optional[str] = None,
    access_token: Optional[str] = None,
    timeout: float = 60.0,
    attempts: int = 3,
    **kwargs: Any,
) -> hivemind.DHT:
    """Start a DHT node in a background process and wait until it is ready.

    The node validates records (``records.record_validators``: signatures, the directory schema of ``experiment``,
    an expiration cap) and, with an ``access_token``, talks only to nodes that hold the same token (``auth.py``).

    A busy bootstrap peer can miss a new node's first connection (p2pd then exits with "failed to connect to bootstrap
    peers", a ``P2PDaemonError``), so starting is tried ``attempts`` times within ``timeout``. Raises ``TimeoutError``
    naming the peers if the node does not start in time, else the last ``P2PDaemonError``: check that
    ``initial_peers`` are reachable multiaddrs (``/ip4/<ip>/tcp/<port>/p2p/<peer id>``).
    """
    deadline = time.monotonic() + timeout
    for attempt in range(1, attempts + 1):
        if access_token is not None:
            kwargs["authorizer"] = AccessToken(access_token, experiment or "").authorizer()
        dht = _OwnedDHT(
            initial_peers=list(initial_peers) if initial_peers else None,
            host_maddrs=list(host_maddrs),
            record_validators=record_validators(experiment),
            start=False,
            **kwargs,
        )
        dht.run_in_background(await_ready=False)
        try:
            dht.wait_until_ready(max(1.0, deadline - time.monotonic()))
            return dht
        except FutureTimeout:
            dht.shutdown()
            raise TimeoutError(f"DHT node did not start within {timeout:.0f}s (initial_peers={initial_peers})") from None
        except P2PDaemonError as e:
            dht.shutdown()
            if attempt == attempts or time.monotonic() >= deadline:
                raise
            log.warning("DHT node could not join %s (%s); trying again (%d/%d)", initial_peers, e, attempt, attempts)
        except BaseException:
            dht.shutdown()
            raise
    raise AssertionError("unreachable")


class AsyncRunner:
    """A daemon thread with its own asyncio loop; ``run(coro, timeout)`` executes a coroutine there and waits.

    hivemind's P2P objects are bound to the loop that created them, so every P2P call of one owner goes through one
    runner.
    """

    def __init__(self, name: str = "distqat-async") -> None:
        self._name = name
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "AsyncRunner":
        """Start the loop's thread; returns once the loop runs."""
        ready = threading.Event()

        def _main() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

        self._thread = threading.Thread(target=_main, name=self._name, daemon=True)
        self._thread.start()
        ready.wait()
        return self

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "AsyncRunner.start() was not called"
        return self._loop

    def run(self, coro: Coroutine[Any, Any, T], timeout: Optional[float] = None) -> T:
        """Run ``coro`` on the runner's loop. On timeout the coroutine is cancelled and ``TimeoutError`` raised."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise TimeoutError(f"no result within {timeout}s") from None

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel what still runs on the loop, stop it and join its thread (waiting up to ``timeout`` seconds)."""
        if self._thread is None or self._loop is None:
            return

        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(_cancel_all(), self._loop).result(timeout)
            except Exception:  # noqa: BLE001 - best effort; the loop is stopped below anyway
                log.debug("AsyncRunner: cancelling tasks failed", exc_info=True)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("AsyncRunner %s did not stop within %.0fs", self._name, timeout)
        self._thread = None
