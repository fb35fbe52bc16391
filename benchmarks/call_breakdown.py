"""Where a stage call's time goes: one real expert (a width-64 linear stage, its own process and p2pd on loopback) and
one trainer-side handle, timing each kind of call against the bare hivemind round trip (benchmarks/stream_pingpong.py
measures that: ~0.4 ms on an open stream, ~1.2 ms with a new stream per call).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/call_breakdown.py [--calls 300]

Rows: ``info`` (a unary RPC: framing, access checks, no tensors, no executor), ``forward, no grad`` (a streamed call
with a 1x64 tensor through the expert's worker thread), ``forward + backward`` (the pair a training step makes per
stage), each the median of ``--calls`` calls; the streamed ones with a new stream per call and on the expert's session
stream (``SwarmConfig.sessions``), alternating in thirds.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported; the expert inherits it

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lightning_distqat.config import ExpertConfig, SwarmConfig  # noqa: E402
from lightning_distqat.swarm.client import SwarmClient  # noqa: E402
from lightning_distqat.swarm.embedded import EmbeddedSwarm  # noqa: E402
from lightning_distqat.swarm.messages import flatten_structure  # noqa: E402
from lightning_distqat.swarm.records import stage_fingerprint  # noqa: E402


def _median_ms(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(calls: int) -> None:
    stage = nn.Sequential(nn.Linear(64, 64), nn.Tanh())
    swarm = EmbeddedSwarm({"body": stage}, expert_config=ExpertConfig(experiment="breakdown"))
    client = None
    swarm.launch()
    try:
        client = SwarmClient(SwarmConfig(experiment="breakdown", initial_peers=None)).start()
        swarm.start(client.visible_maddrs, trusted_peers=[client.peer_id])
        handle = client.claim_pipeline({"body": stage_fingerprint(stage)})["body"]
        x = torch.randn(1, 64)
        layout, tensors = flatten_structure(((x,), {}), "input")

        def forward_only() -> None:
            handle.forward(uuid.uuid4().hex, layout, tensors, training=False, need_grad=False)

        def forward_backward() -> None:
            rid = uuid.uuid4().hex
            outputs, _ = handle.forward(rid, layout, tensors, training=True, need_grad=True)
            handle.backward(rid, [torch.ones_like(outputs[0])])

        def both(fn) -> tuple[float, float]:  # noqa: ANN001 - a new stream per call, then the session, alternating
            per_call, session = [], []
            for _ in range(3):
                handle.sessions = False
                per_call.append(_median_ms(fn, calls // 3))
                handle.sessions = True
                session.append(_median_ms(fn, calls // 3))
            return statistics.median(per_call), statistics.median(session)

        info = _median_ms(handle.info, calls)
        rows = [("forward, no grad", *both(forward_only)), ("forward + backward", *both(forward_backward))]
        print(f"{'call':<22} {'stream per call':>16} {'session':>9} {'ratio':>6}")
        print(f"{'info (unary)':<22} {info:>13.2f} ms")
        for name, per_call, session in rows:
            print(f"{name:<22} {per_call:>13.2f} ms {session:>6.2f} ms {per_call / session:>6.2f}")
    finally:
        if client is not None:
            client.shutdown()
        swarm.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    main(parser.parse_args().calls)
