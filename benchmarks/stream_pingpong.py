"""Round trips through hivemind P2P on loopback: a new stream per call (what every stage call does today) versus one
long-lived stream that carries request after request (the session of [perf] item 1). Both sides are real hivemind
P2P daemons; the handler echoes a payload of the same size. Measured alternately in one run, median of each.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stream_pingpong.py [--calls 300]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import AsyncIterator

from lightning_distqat import _hivemind  # noqa: F401  (quiet hivemind import)
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2


async def _echo(request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(tensors=request.tensors)


async def _echo_stream(requests: AsyncIterator[runtime_pb2.ExpertRequest],
                       context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
    async for request in requests:
        yield runtime_pb2.ExpertResponse(tensors=request.tensors)


async def _new_streams(client: P2P, peer, request, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        responses = await client.iterate_protobuf_handler(peer, "echo_stream", request, runtime_pb2.ExpertResponse)
        async for _ in responses:
            pass
        times.append(time.perf_counter() - start)
    return times


async def _one_stream(client: P2P, peer, request, calls: int) -> list[float]:
    queue: asyncio.Queue = asyncio.Queue()

    async def requests() -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while True:
            item = await queue.get()
            if item is None:
                return
            yield item

    responses = (await client.iterate_protobuf_handler(peer, "echo_stream", requests(), runtime_pb2.ExpertResponse))
    responses = responses.__aiter__()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        await queue.put(request)
        await responses.__anext__()
        times.append(time.perf_counter() - start)
    await queue.put(None)
    async for _ in responses:
        pass
    return times


async def main(calls: int) -> None:
    server = await P2P.create()
    client = await P2P.create(initial_peers=await server.get_visible_maddrs())
    try:
        await server.add_protobuf_handler("echo", _echo, runtime_pb2.ExpertRequest)
        await server.add_protobuf_handler("echo_stream", _echo_stream, runtime_pb2.ExpertRequest, stream_input=True,
                                          stream_output=True)
        print(f"{'payload':>10} {'new stream / call':>18} {'one open stream':>16} {'ratio':>6}")
        for size in (1 << 10, 64 << 10, 1 << 20):
            request = runtime_pb2.ExpertRequest(tensors=[runtime_pb2.Tensor(buffer=b"x" * size, dtype="uint8",
                                                                             size=[size])])
            await _new_streams(client, server.peer_id, request, 20)  # warm up both paths
            await _one_stream(client, server.peer_id, request, 20)
            fresh, kept = [], []
            for _ in range(3):  # alternate, so drift hits both alike
                fresh += await _new_streams(client, server.peer_id, request, calls // 3)
                kept += await _one_stream(client, server.peer_id, request, calls // 3)
            a, b = statistics.median(fresh) * 1e3, statistics.median(kept) * 1e3
            print(f"{size // 1024:>7} KiB {a:>15.2f} ms {b:>13.2f} ms {a / b:>6.2f}")
    finally:
        await client.shutdown()
        await server.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    asyncio.run(main(parser.parse_args().calls))
