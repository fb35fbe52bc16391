"""``distqat-netem`` (``python -m lightning_distqat.netem``): a user-space link emulator. A TCP proxy that makes a
loopback (or LAN) connection behave like an internet link: a one-way delay in each direction, a bandwidth limit (a
token bucket per direction, shared by every connection through the proxy, like one peer's access link), optional
jitter, refused connections and connections cut after a random lifetime. Linux's ``tc netem`` does this in the
kernel; this needs no privileges and no kernel module.

A peer sits behind a proxy by listening on one port and announcing the proxy's port to the others: for an expert,
``expert.host_maddrs=[/ip4/127.0.0.1/tcp/<listen>]`` and ``expert.announce_maddrs=[/ip4/127.0.0.1/tcp/<proxy>]``; a
trainer's ``SwarmConfig(host_maddrs=..., announce_maddrs=...)`` likewise. Every connection that another peer dials
then goes through the dialed peer's proxy, so put every peer behind one to emulate a swarm of remote machines::

    distqat-netem --listen 127.0.0.1:40001 --to 127.0.0.1:40000 --delay-ms 50 --rate-mbit 20

Delay is one-way: a round trip through one proxy takes ``2 x delay_ms`` plus the transfer time of what was sent.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import random
import signal
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["Link", "TokenBucket", "LinkProxy", "Netem", "main"]

log = logging.getLogger(__name__)

_CHUNK = 16384
"""Bytes read at once from a socket: the granularity at which bytes are scheduled on the link."""


@dataclass(frozen=True, kw_only=True)
class Link:
    """One peer's access link, the same in both directions."""

    delay_ms: float = 0.0
    """One-way delay added to every byte in each direction (a round trip through the proxy adds twice this)."""

    rate_mbit: Optional[float] = None
    """Bandwidth of each direction in megabits (10^6 bits) per second, shared by all connections; ``None``: no limit."""

    jitter_ms: float = 0.0
    """Extra delay drawn uniformly from [0, jitter_ms] for every chunk; a connection's bytes stay in order."""

    burst_bytes: int = _CHUNK
    """Bytes the token bucket lets through at once after an idle period."""

    refuse: float = 0.0
    """Probability that a new connection is closed at once (a lost connection attempt)."""

    mean_lifetime_s: Optional[float] = None
    """Cut every connection after an exponentially distributed time with this mean (``None``: never)."""

    buffer_bytes: Optional[int] = None
    """Bytes queued in the link per connection and direction before the proxy stops reading from the sender
    (TCP back pressure); ``None``: twice the bandwidth-delay product, at least 256 KiB."""

    seed: int = 0
    """Seed of the jitter, refusals and lifetimes (the same seed gives the same choices in the same order)."""

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"Link: {name} must be {rule}, got {getattr(self, name)!r}")

        for name in ("delay_ms", "jitter_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 3_600_000:
                raise bad(name, "a number of milliseconds >= 0")
        if self.rate_mbit is not None and (isinstance(self.rate_mbit, bool) or not isinstance(self.rate_mbit, (
                int, float)) or not 0 < self.rate_mbit < math.inf):
            raise bad("rate_mbit", "a number of megabits per second > 0, or None for no limit")
        if isinstance(self.burst_bytes, bool) or not isinstance(self.burst_bytes, int) or self.burst_bytes < 1:
            raise bad("burst_bytes", "an int >= 1")
        if isinstance(self.refuse, bool) or not isinstance(self.refuse, (int, float)) or not 0 <= self.refuse <= 1:
            raise bad("refuse", "a probability in [0, 1]")
        if self.mean_lifetime_s is not None and (isinstance(self.mean_lifetime_s, bool) or not isinstance(
                self.mean_lifetime_s, (int, float)) or not self.mean_lifetime_s > 0):
            raise bad("mean_lifetime_s", "a number of seconds > 0, or None")
        if self.buffer_bytes is not None and (isinstance(self.buffer_bytes, bool)
                                              or not isinstance(self.buffer_bytes, int) or self.buffer_bytes < 1):
            raise bad("buffer_bytes", "an int >= 1, or None")

    @property
    def bytes_per_s(self) -> Optional[float]:
        return None if self.rate_mbit is None else self.rate_mbit * 1e6 / 8

    @property
    def queue_limit(self) -> int:
        if self.buffer_bytes is not None:
            return self.buffer_bytes
        bdp = (self.bytes_per_s or 0) * self.delay_ms / 1000
        return max(256 * 1024, int(2 * bdp))


class TokenBucket:
    """Departure times of chunks on a link of ``rate`` bytes/s that lets ``burst`` bytes through at once. Pure
    arithmetic on the caller's clock: a chunk that finds too few tokens borrows them, and leaves when the debt is paid,
    so chunks leave in the order they were offered, back to back at the rate."""

    def __init__(self, rate: float, burst: int) -> None:
        if not rate > 0 or burst < 1:
            raise ValueError(f"TokenBucket: rate must be > 0 and burst >= 1, got rate={rate!r}, burst={burst!r}")
        self.rate, self.burst = float(rate), float(burst)
        self._tokens = float(burst)
        self._at: Optional[float] = None

    def departure(self, size: int, now: float) -> float:
        """When the last of ``size`` bytes offered at ``now`` has left."""
        if self._at is not None:
            now = max(now, self._at)  # a clock that steps back (another caller) does not mint tokens
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= size
        return now if self._tokens >= 0 else now - self._tokens / self.rate


@dataclass
class _Stats:
    connections: int = 0
    refused: int = 0
    cut: int = 0
    bytes_up: int = 0
    """Bytes that crossed the link toward the proxied peer."""
    bytes_down: int = 0
    """Bytes that crossed the link back from it."""


class LinkProxy:
    """Accepts TCP connections on ``listen`` and forwards each to ``target`` through an emulated :class:`Link`. Runs
    on the event loop that calls :meth:`start`; :meth:`close` stops it and cuts its connections."""

    def __init__(self, target: tuple[str, int], link: Link, listen: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.target, self.link, self.listen = target, link, listen
        self.stats = _Stats()
        self._random = random.Random(link.seed)
        rate = link.bytes_per_s
        self._buckets = {d: TokenBucket(rate, link.burst_bytes) if rate else None for d in ("up", "down")}
        self._server: Optional[asyncio.base_events.Server] = None
        self._tasks: set[asyncio.Task] = set()
        self.port: Optional[int] = None

    async def start(self) -> "LinkProxy":
        self._server = await asyncio.start_server(self._accept, *self.listen)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._server is not None:
            await asyncio.wait_for(self._server.wait_closed(), timeout=5)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._random.random() < self.link.refuse:
            self.stats.refused += 1
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), timeout=10)
        except (OSError, asyncio.TimeoutError) as e:
            log.debug("netem: cannot reach %s:%s (%s)", *self.target, e)
            return
        self.stats.connections += 1
        lifetime = (self._random.expovariate(1 / self.link.mean_lifetime_s)
                    if self.link.mean_lifetime_s is not None else None)
        up, down = _OneWay(self, "up"), _OneWay(self, "down")
        tasks = [asyncio.create_task(up.read(reader)), asyncio.create_task(up.deliver(up_writer)),
                 asyncio.create_task(down.read(up_reader)), asyncio.create_task(down.deliver(writer))]
        try:
            # both directions end (EOF each way), or one side resets or stops taking bytes (the connection is cut),
            # or the lifetime ends
            _, pending = await asyncio.wait(tasks, timeout=lifetime, return_when=asyncio.FIRST_EXCEPTION)
            if pending and lifetime is not None and not any(t.done() and t.exception() for t in tasks):
                self.stats.cut += 1
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            up_writer.transport.abort()


class _OneWay:
    """One direction of one connection through a link: :meth:`read` schedules each chunk (it leaves when the token
    bucket lets it and arrives ``delay`` + jitter later, never before the chunk before it); :meth:`deliver` writes it
    then. Reading pauses while ``queue_limit`` bytes are in the link."""

    def __init__(self, proxy: LinkProxy, direction: str) -> None:
        self.proxy, self.direction = proxy, direction
        self.bucket = proxy._buckets[direction]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.room = asyncio.Event()
        self.room.set()
        self.queued = 0
        self.last_arrival = 0.0

    async def read(self, source: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        link, stats = self.proxy.link, self.proxy.stats
        while True:
            data = await source.read(_CHUNK)
            now = loop.time()
            leaves = self.bucket.departure(len(data), now) if (self.bucket is not None and data) else now
            extra = self.proxy._random.uniform(0, link.jitter_ms) if link.jitter_ms else 0.0
            self.last_arrival = max(self.last_arrival, leaves + (link.delay_ms + extra) / 1000)
            if not data:
                self.queue.put_nowait((self.last_arrival, None))
                return
            if self.direction == "up":
                stats.bytes_up += len(data)
            else:
                stats.bytes_down += len(data)
            self.queued += len(data)
            self.queue.put_nowait((self.last_arrival, data))
            if self.queued > link.queue_limit:
                self.room.clear()
                await self.room.wait()

    async def deliver(self, sink: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            arrival, data = await self.queue.get()
            wait = arrival - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                if sink.can_write_eof():
                    sink.write_eof()
                await sink.drain()
                return
            sink.write(data)
            await sink.drain()
            self.queued -= len(data)
            if self.queued <= self.proxy.link.queue_limit:
                self.room.set()


class Netem:
    """Link proxies on a background thread's event loop, for programs that are not asyncio (a benchmark, a test)::

        with Netem() as netem:
            proxy_port = netem.add(40000, Link(delay_ms=50, rate_mbit=20))

    ``close()`` (or leaving the ``with``) cuts every connection and stops the thread."""

    def __init__(self) -> None:
        self.proxies: list[LinkProxy] = []
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Netem":
        ready = threading.Event()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            loop.call_soon(ready.set)
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="distqat-netem", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("Netem: the proxy thread did not start within 10 s")
        return self

    def add(self, target_port: int, link: Link, listen_port: int = 0, host: str = "127.0.0.1") -> int:
        """Proxy ``host:listen_port`` (0: any free port) to ``host:target_port`` through ``link``; returns the
        proxy's port. The target need not listen yet: each connection dials it when it is accepted."""
        if self._loop is None:
            self.start()
        proxy = LinkProxy((host, target_port), link, (host, listen_port))
        asyncio.run_coroutine_threadsafe(proxy.start(), self._loop).result(timeout=10)
        self.proxies.append(proxy)
        return proxy.port

    def close(self) -> None:
        if self._loop is None:
            return
        loop, self._loop = self._loop, None

        async def close_all() -> None:
            await asyncio.gather(*(p.close() for p in self.proxies))

        try:
            asyncio.run_coroutine_threadsafe(close_all(), loop).result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> "Netem":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"an address is HOST:PORT, got {text!r}")
    return host, int(port)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="distqat-netem", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=_address, required=True, action="append",
                        help="HOST:PORT to accept connections on (repeat with --to for several proxies)")
    parser.add_argument("--to", type=_address, required=True, action="append", help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay in each direction")
    parser.add_argument("--rate-mbit", type=float, default=None, help="bandwidth of each direction (Mbit/s)")
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--refuse", type=float, default=0.0, help="probability of refusing a connection")
    parser.add_argument("--mean-lifetime-s", type=float, default=None, help="cut connections after ~this long")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if len(args.listen) != len(args.to):
        parser.error("give one --to for every --listen")
    try:
        link = Link(delay_ms=args.delay_ms, rate_mbit=args.rate_mbit, jitter_ms=args.jitter_ms, refuse=args.refuse,
                    mean_lifetime_s=args.mean_lifetime_s, seed=args.seed)
    except ValueError as e:
        parser.error(str(e))

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        proxies = [await LinkProxy(to, link, listen).start() for listen, to in zip(args.listen, args.to)]
        for proxy, (host, port) in zip(proxies, args.to):
            print(f"distqat-netem: {proxy.listen[0]}:{proxy.port} -> {host}:{port} ({link.delay_ms:g} ms one way, "
                  f"{'unlimited' if link.rate_mbit is None else f'{link.rate_mbit:g} Mbit/s'})", flush=True)
        await stop.wait()
        await asyncio.gather(*(p.close() for p in proxies))
        for proxy in proxies:
            s = proxy.stats
            print(f"distqat-netem: {proxy.port}: {s.connections} connections ({s.refused} refused, {s.cut} cut), "
                  f"{s.bytes_up} bytes up, {s.bytes_down} bytes down", flush=True)

    asyncio.run(serve())


if __name__ == "__main__":
    main()
