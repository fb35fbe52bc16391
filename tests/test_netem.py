"""The link emulator keeps its promises: the delay and the rate it is set to (within 10%), order under jitter, refused
and cut connections, clear errors for bad settings; and a pipeline whose peers announce their links' ports trains
through them. Real sockets on loopback, a real expert process and DHT, no mocks."""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from lightning_distqat import DistqatStrategy, SwarmConfig
from lightning_distqat.netem import Link, LinkProxy, Netem, TokenBucket
from lightning_distqat.swarm.dht import start_dht
from tests.helpers import ThreeStageNet, fit_params, interrupt_all, max_rel_diff

ROOT = Path(__file__).resolve().parents[1]


async def _echo_server() -> asyncio.base_events.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


def _port(server: asyncio.base_events.Server) -> int:
    return server.sockets[0].getsockname()[1]


def test_a_round_trip_takes_twice_the_one_way_delay():
    async def run() -> list[float]:
        server = await _echo_server()
        proxy = await LinkProxy(("127.0.0.1", _port(server)), Link(delay_ms=40)).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        times = []
        for _ in range(6):
            started = time.perf_counter()
            writer.write(b"ping")
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
            times.append(time.perf_counter() - started)
        writer.close()
        await proxy.close()
        server.close()
        return times

    rtt = statistics.median(asyncio.run(run()))
    assert 0.080 <= rtt <= 0.088, rtt


@pytest.mark.parametrize("direction", ["up", "down"])
def test_bytes_flow_at_the_rate_of_the_link(direction):
    """2.5 MB/s (20 Mbit/s) each way: 1.5 MB take 0.6 s (after the first burst), whichever way they go."""
    size, link = 1_500_000, Link(rate_mbit=20, delay_ms=5)

    async def run() -> float:
        received = asyncio.Event()
        arrived: list[float] = []

        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if direction == "down":  # the proxied peer sends
                writer.write(b"x" * size)
                await writer.drain()
                writer.close()
                return
            total = 0
            while data := await reader.read(65536):
                arrived.append(time.perf_counter())
                total += len(data)
                if total == size:
                    received.set()
            writer.close()

        server = await asyncio.start_server(sink, "127.0.0.1", 0)
        proxy = await LinkProxy(("127.0.0.1", _port(server)), link).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        if direction == "up":
            writer.write(b"x" * size)
            await writer.drain()
            await asyncio.wait_for(received.wait(), 10)
        else:
            total = 0
            while total < size:
                data = await asyncio.wait_for(reader.read(65536), 10)
                assert data, "the link closed early"
                arrived.append(time.perf_counter())
                total += len(data)
        writer.close()
        await proxy.close()
        server.close()
        assert (proxy.stats.bytes_up if direction == "up" else proxy.stats.bytes_down) == size
        return arrived[-1] - arrived[0]

    seconds = asyncio.run(run())
    expected = (size - link.burst_bytes) / link.bytes_per_s
    assert 0.9 * expected <= seconds <= 1.1 * expected, (seconds, expected)


def test_connections_through_one_link_share_its_rate():
    """Two senders at once through one 20 Mbit/s link: 2 x 0.5 MB take as long as 1 MB alone (0.4 s), not 0.2 s."""
    size, link = 500_000, Link(rate_mbit=20)

    async def run() -> float:
        done = []
        both = asyncio.Event()

        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            total = 0
            while data := await reader.read(65536):
                total += len(data)
            done.append((total, time.perf_counter()))
            if len(done) == 2:
                both.set()
            writer.close()

        server = await asyncio.start_server(sink, "127.0.0.1", 0)
        proxy = await LinkProxy(("127.0.0.1", _port(server)), link).start()

        async def send() -> None:
            _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"y" * size)
            writer.write_eof()
            await writer.drain()

        started = time.perf_counter()
        await asyncio.gather(send(), send())
        await asyncio.wait_for(both.wait(), 10)
        await proxy.close()
        server.close()
        assert [total for total, _ in done] == [size, size]
        return max(t for _, t in done) - started

    seconds = asyncio.run(run())
    expected = (2 * size - 2 * link.burst_bytes) / link.bytes_per_s
    assert 0.9 * expected <= seconds <= 1.1 * expected + 0.02, (seconds, expected)


def test_jitter_keeps_a_connections_bytes_in_order():
    async def run() -> bytes:
        server = await _echo_server()
        proxy = await LinkProxy(("127.0.0.1", _port(server)), Link(delay_ms=2, jitter_ms=10, seed=3)).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        payload = b"".join(i.to_bytes(4, "big") for i in range(50_000))
        for i in range(0, len(payload), 7000):  # many small writes: many chunks with their own jitter
            writer.write(payload[i:i + 7000])
            await writer.drain()
        echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 20)
        writer.close()
        await proxy.close()
        server.close()
        assert echoed == payload
        return echoed

    asyncio.run(run())


def test_refused_and_cut_connections():
    async def run() -> tuple[bytes, float, LinkProxy, LinkProxy]:
        server = await _echo_server()
        refusing = await LinkProxy(("127.0.0.1", _port(server)), Link(refuse=1.0)).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", refusing.port)
        writer.write(b"hello")
        try:
            refused = await asyncio.wait_for(reader.read(10), 5)
        except ConnectionResetError:
            refused = b""
        writer.close()

        cutting = await LinkProxy(("127.0.0.1", _port(server)), Link(mean_lifetime_s=0.2, seed=1)).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", cutting.port)
        started = time.perf_counter()
        deadline = time.monotonic() + 10
        alive = True
        while alive and time.monotonic() < deadline:  # ping until the link cuts the connection
            try:
                writer.write(b"ping")
                await writer.drain()
                alive = await asyncio.wait_for(reader.read(4), 5) == b"ping"
            except (ConnectionResetError, BrokenPipeError):
                alive = False
        lived = time.perf_counter() - started
        writer.close()
        await refusing.close()
        await cutting.close()
        server.close()
        return refused, lived, refusing, cutting

    refused, lived, refusing, cutting = asyncio.run(run())
    assert refused == b"" and refusing.stats.refused == 1 and refusing.stats.connections == 0
    assert cutting.stats.cut == 1 and lived < 5


def test_a_netem_thread_proxies_for_programs_without_an_event_loop():
    with socket.create_server(("127.0.0.1", 0)) as target, Netem() as netem:
        port = netem.add(target.getsockname()[1], Link(delay_ms=30))
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            conn, _ = target.accept()  # the proxy dials the target once it accepted the client
            with conn:
                client.sendall(b"abc")
                conn.settimeout(5)
                assert conn.recv(3) == b"abc"
        assert time.perf_counter() - started >= 0.030
        assert netem.proxies[0].stats.bytes_up == 3


def test_the_token_bucket_lets_a_burst_through_then_paces_at_the_rate():
    bucket = TokenBucket(rate=1000.0, burst=100)
    assert bucket.departure(100, now=0.0) == 0.0  # the burst leaves at once
    assert bucket.departure(500, now=0.0) == pytest.approx(0.5)  # then 1000 bytes/s
    assert bucket.departure(100, now=0.1) == pytest.approx(0.6)  # queued behind the debt
    assert bucket.departure(50, now=10.0) == 10.0  # idle long enough: a burst again


@pytest.mark.parametrize("kwargs,name", [
    (dict(delay_ms=-1), "delay_ms"), (dict(rate_mbit=0), "rate_mbit"), (dict(refuse=1.5), "refuse"),
    (dict(mean_lifetime_s=0), "mean_lifetime_s"), (dict(burst_bytes=0), "burst_bytes"), (dict(jitter_ms="5"),
                                                                                         "jitter_ms"),
])
def test_bad_link_settings_name_the_setting(kwargs, name):
    with pytest.raises(ValueError, match=f"Link: {name} must be"):
        Link(**kwargs)


# ------------------------------------------------------------------------------------------- a swarm behind links
class _StepTimes(Callback):
    def __init__(self) -> None:
        self.started, self.seconds = 0.0, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
        self.seconds.append(time.perf_counter() - self.started)


@pytest.mark.swarm
@pytest.mark.timeout(180)
def test_a_pipeline_trains_through_the_links_that_its_peers_announce(tmp_path):
    """A standalone expert and the trainer each listen behind a 25 ms link and announce the link's port
    (``expert.announce_maddrs``, ``SwarmConfig.announce_maddrs``): every step pays the forward and backward round
    trips (>= 100 ms), all of the pipeline's tensors cross the links, and the result equals plain Lightning."""
    link = Link(delay_ms=25, rate_mbit=200)
    bootstrap = start_dht()
    peer = str(bootstrap.get_visible_maddrs()[0])
    with socket.create_server(("127.0.0.1", 0)) as a, socket.create_server(("127.0.0.1", 0)) as b:
        expert_port, trainer_port = a.getsockname()[1], b.getsockname()[1]  # two distinct free ports
    with Netem() as netem:
        expert_proxy, trainer_proxy = netem.add(expert_port, link), netem.add(trainer_port, link)
        expert = subprocess.Popen(
            [str(Path(sys.executable).with_name("distqat-expert")), "model._target_=tests.helpers.ThreeStageNet",
             "~model.arch", "~model.num_classes", "expert.experiment=netem", "expert.stage=body",
             f"expert.initial_peers=[{peer}]", f"expert.host_maddrs=[/ip4/127.0.0.1/tcp/{expert_port}]",
             f"expert.announce_maddrs=[/ip4/127.0.0.1/tcp/{expert_proxy}]", f"hydra.run.dir={tmp_path}/expert"],
            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "expert.err").open("w"))
        try:
            times = _StepTimes()
            strategy = DistqatStrategy(stages=["body"], swarm=SwarmConfig(
                experiment="netem", initial_peers=[peer], shared_memory=False, discovery_timeout=90,
                host_maddrs=[f"/ip4/127.0.0.1/tcp/{trainer_port}"],
                announce_maddrs=[f"/ip4/127.0.0.1/tcp/{trainer_proxy}"]))
            swarm, _ = fit_params(ThreeStageNet, max_steps=4, callbacks=[times], strategy=strategy)
            wire = strategy.wire_bytes()
        finally:
            interrupt_all([expert])
            bootstrap.shutdown()
        through = sum(p.stats.bytes_up + p.stats.bytes_down for p in netem.proxies)
    local, _ = fit_params(ThreeStageNet, max_steps=4)
    assert max_rel_diff(swarm.state_dict(), local.state_dict()) <= 1e-5
    assert min(times.seconds) >= 4 * link.delay_ms / 1000, times.seconds  # two round trips per step
    assert through >= wire["bytes_sent"] + wire["bytes_received"] > 0, (through, wire)


@pytest.mark.parametrize("kwargs,message", [
    (dict(announce_maddrs=["/ip4/127.0.0.1/tcp/0"]), "announce_maddrs need an explicit port"),
    (dict(announce_maddrs="/ip4/127.0.0.1/tcp/4000"), "announce_maddrs must be a list of multiaddrs"),
    (dict(host_maddrs=["127.0.0.1:4000"]), "host_maddrs must be a list of multiaddrs"),
])
def test_a_trainers_addresses_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=f"SwarmConfig: {message}"):
        SwarmConfig(**kwargs)
