"""Training over an emulated internet link: every peer behind its own ``distqat-netem`` link (``lightning_distqat/
netem.py``: a one-way delay each way and a bandwidth cap per direction), at RTT 20 ms / 100 Mbit/s and RTT 100 ms /
20 Mbit/s.

- Pipeline: 3 standalone experts (a width-512 ``ThreeStageNet``) and one trainer, batch 64: fp32 vs int8 activations
  and gradients on the wire, 1 vs 4 micro-batches in flight.
- DiLoCo: 2 data-parallel replicas of the same model (batch 32 each): averaging after every step (outer SGD, lr 1:
  plain parameter averaging) vs DiLoCo with H = 10 and 50 inner steps (outer Nesterov, lr 0.7, momentum 0.5), fp32
  vs int8 pseudo-gradients.

Prints wall-clock samples/s, the seconds until the training loss (mean of 5 steps) first reaches a fixed target, and
the megabytes that crossed the links, each variant of one link measured in the same run. Shared memory is off: peers
on other machines cannot use it. Every process runs with OMP_NUM_THREADS=1.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/wan.py [--links 0,1] [--quick]
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

from lightning_distqat.netem import Link, Netem  # noqa: E402

LINKS = [("RTT 20 ms, 100 Mbit/s", Link(delay_ms=10, rate_mbit=100)),
         ("RTT 100 ms, 20 Mbit/s", Link(delay_ms=50, rate_mbit=20))]
WIDTH = 512
STAGES = ["stem", "body", "head"]
PIPELINE_BATCH, PIPELINE_STEPS, PIPELINE_TARGET = 64, 40, 1.0
DILOCO_BATCH, DILOCO_TARGET = 32, 1.2
DILOCO_OUTER = dict(outer_lr=0.7, outer_momentum=0.5)
"""Nesterov, as DiLoCo's default, with momentum 0.5: the default 0.9 overshoots at H = 10 on this small task (the loss
rose again after the second round); at H = 50 both train."""


@dataclass(frozen=True)
class Variant:
    name: str
    steps: int
    codec: str = "none"
    micro_batches: int = 1
    inner_steps: int = 0
    """DiLoCo only: inner steps per round; 1 is parameter averaging after every step."""


PIPELINE = [Variant("fp32, m=1", PIPELINE_STEPS), Variant("int8 wire, m=1", PIPELINE_STEPS, codec="int8"),
            Variant("fp32, m=4", PIPELINE_STEPS, micro_batches=4),
            Variant("int8 wire, m=4", PIPELINE_STEPS, codec="int8", micro_batches=4)]
DILOCO = [Variant("every step, fp32", 12, inner_steps=1), Variant("H=10, fp32", 60, inner_steps=10),
          Variant("H=10, int8 pseudo-gradients", 60, codec="int8", inner_steps=10),
          Variant("H=50, fp32", 100, inner_steps=50),
          Variant("H=50, int8 pseudo-gradients", 100, codec="int8", inner_steps=50)]


def _free_ports(n: int) -> list[int]:
    sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(n)]
    try:
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _maddr(port: int) -> str:
    return f"/ip4/127.0.0.1/tcp/{port}"


class _Swarm:
    """A bootstrap DHT node (not behind a link: it only introduces peers), a Netem thread, and the processes this
    run started, stopped in reverse order."""

    def __init__(self, link: Link, stack: ExitStack) -> None:
        from lightning_distqat.swarm.dht import start_dht

        self.link = link
        self.netem = stack.enter_context(Netem())
        self.node = start_dht()
        stack.callback(self.node.shutdown)
        self.peer = str(self.node.get_visible_maddrs()[0])
        self.processes: list[subprocess.Popen] = []
        stack.callback(self._stop)

    def behind_link(self) -> tuple[int, int]:
        """(port to listen on, port others dial): a proxy through the link in front of the listening port."""
        listen = _free_ports(1)[0]
        return listen, self.netem.add(listen, self.link)

    def bytes_through(self) -> int:
        return sum(p.stats.bytes_up + p.stats.bytes_down for p in self.netem.proxies)

    def start(self, args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "w") as out:
            process = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def _stop(self) -> None:
        from tests.helpers import interrupt_all

        interrupt_all(self.processes)


def _worker(args: list[str], swarm: _Swarm, out: Path, log: Path) -> subprocess.Popen:
    listen, dial = swarm.behind_link()
    return swarm.start([sys.executable, str(Path(__file__)), "--worker", json.dumps(
        {"out": str(out), "peer": swarm.peer, "listen": listen, "dial": dial, "args": args})], log)


def _wait(processes: list[subprocess.Popen], logs: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p, log in zip(processes, logs):
        try:
            code = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"a worker ran past {timeout:.0f} s: {log.read_text()[-3000:]}") from None
        if code != 0:
            raise RuntimeError(f"a worker failed (exit code {code}): {log.read_text()[-3000:]}")


def _time_to(target: float, times: list[float], losses: list[float]) -> Optional[float]:
    for i in range(4, len(losses)):
        if sum(losses[i - 4:i + 1]) / 5 <= target:
            return times[i]
    return None


def _pipeline(link: Link, variants: list[Variant], tmp: Path) -> list[dict[str, Any]]:
    results = []
    with ExitStack() as stack:
        swarm = _Swarm(link, stack)
        for stage in STAGES:
            listen, dial = swarm.behind_link()
            swarm.start([str(Path(sys.executable).with_name("distqat-expert")),
                         "model._target_=tests.helpers.ThreeStageNet", "~model.arch", "~model.num_classes",
                         f"+model.width={WIDTH}", "expert.experiment=wan", f"expert.stage={stage}",
                         f"expert.initial_peers=[{swarm.peer}]", f"expert.host_maddrs=[{_maddr(listen)}]",
                         f"expert.announce_maddrs=[{_maddr(dial)}]", f"hydra.run.dir={tmp}/{stage}"],
                        tmp / f"{stage}.log")
        for i, v in enumerate(variants):
            out, log = tmp / f"p{i}.json", tmp / f"p{i}.log"
            before = swarm.bytes_through()
            worker = _worker(["pipeline", v.codec, str(v.micro_batches), str(v.steps)], swarm, out, log)
            _wait([worker], [log], 600)
            result = json.loads(out.read_text())
            result["mb"] = (swarm.bytes_through() - before) / 1e6
            results.append(result)
    return results


def _diloco(link: Link, v: Variant, tmp: Path, index: int) -> dict[str, Any]:
    with ExitStack() as stack:
        swarm = _Swarm(link, stack)
        outs = [tmp / f"d{index}-{r}.json" for r in range(2)]
        logs = [tmp / f"d{index}-{r}.log" for r in range(2)]
        workers = [_worker(["diloco", v.codec, str(v.inner_steps), str(v.steps), str(r)], swarm, out, log)
                   for r, (out, log) in enumerate(zip(outs, logs))]
        _wait(workers, logs, 600)
        replicas = [json.loads(out.read_text()) for out in outs]
        mb = swarm.bytes_through() / 1e6
    return {"replicas": replicas, "mb": mb}


# ---------------------------------------------------------------------------------------------------- the workers
def _run_worker(spec: dict[str, Any]) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    from lightning_distqat import DiLoCoConfig, DistqatStrategy, QuantConfig, SwarmConfig
    from tests.helpers import ThreeStageNet, quiet_trainer, toy_loader

    class Clock(Callback):
        def __init__(self) -> None:
            self.start, self.times, self.losses = 0.0, [], []

        def on_train_start(self, trainer, pl_module):  # noqa: ANN001
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            self.times.append(time.perf_counter() - self.start)
            self.losses.append(float(outputs["loss"]))

    role, codec, knob, steps, *rest = spec["args"]
    steps = int(steps)
    swarm = SwarmConfig(experiment="wan", initial_peers=[spec["peer"]], host_maddrs=[_maddr(spec["listen"])],
                        announce_maddrs=[_maddr(spec["dial"])], shared_memory=False, mirror_every=0,
                        discovery_timeout=120, request_timeout=120, telemetry_period=0)
    pl.seed_everything(0, verbose=False)  # the same initial weights in every run and replica
    model = ThreeStageNet(optimizer="adamw", width=WIDTH)
    if role == "pipeline":
        quant = QuantConfig(activations=codec, gradients=codec) if codec != "none" else None
        strategy = DistqatStrategy(stages=STAGES, micro_batches=int(knob), quant=quant, swarm=swarm)
        batch, seed = PIPELINE_BATCH, 0
    else:
        h, rank = int(knob), int(rest[0])
        outer = dict(outer_lr=1.0, outer_momentum=0.0, nesterov=False) if h == 1 else DILOCO_OUTER
        strategy = DistqatStrategy(
            swarm=swarm, quant=QuantConfig(pseudo_gradients=codec) if codec != "none" else None,
            diloco=DiLoCoConfig(inner_steps=h, matchmaking_time=1.0, averaging_timeout=60.0, **outer))
        batch, seed = DILOCO_BATCH, 100 + rank
    clock = Clock()
    trainer = quiet_trainer(max_steps=steps, callbacks=[clock], strategy=strategy)
    trainer.fit(model, toy_loader(n=steps * batch, batch_size=batch, seed=seed))
    wire = strategy.wire_bytes() if role == "pipeline" else {}
    rounds = [r.get("group_size") for r in strategy.diloco_reports]
    Path(spec["out"]).write_text(json.dumps({"times": clock.times, "losses": clock.losses, "batch": batch,
                                             "wire": wire, "groups": rounds}))


def _table(title: str, rows: list[tuple[str, float, Optional[float], float]], target: float) -> None:
    print(f"\n{title}\n")
    print(f"| variant | samples/s | x first row | seconds to loss {target:g} | MB through the links |")
    print("|---|---:|---:|---:|---:|")
    for name, sps, seconds, mb in rows:
        reached = f"{seconds:.1f}" if seconds is not None else "not reached"
        print(f"| {name} | {sps:.1f} | {sps / rows[0][1]:.2f} | {reached} | {mb:.1f} |")


def _chosen(variants: list[Variant], args: argparse.Namespace) -> list[Variant]:
    chosen = [v for v in variants if args.only is None or args.only in v.name]
    return chosen[:1] if args.quick else chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--links", default="0,1", help="which links to measure: 0 (RTT 20 ms), 1 (RTT 100 ms)")
    parser.add_argument("--quick", action="store_true", help="the first variant of each part only")
    parser.add_argument("--part", choices=["all", "pipeline", "diloco"], default="all")
    parser.add_argument("--only", help="run the variants whose names contain this text")
    parser.add_argument("--keep", type=Path, help="keep the logs and results in this folder")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _run_worker(json.loads(args.worker))
        return
    started = time.monotonic()
    for index in (int(i) for i in args.links.split(",")):
        name, link = LINKS[index]
        with ExitStack() as scope:
            tmp = args.keep / str(index) if args.keep else scope.enter_context(tempfile.TemporaryDirectory())
            Path(tmp).mkdir(parents=True, exist_ok=True)
            if args.part in ("all", "pipeline"):
                variants = _chosen(PIPELINE, args)
                rows = []
                for v, r in zip(variants, _pipeline(link, variants, Path(tmp))):
                    times = r["times"]
                    sps = (len(times) - 1) * r["batch"] / (times[-1] - times[0])  # the first step warms up
                    rows.append((v.name, sps, _time_to(PIPELINE_TARGET, times, r["losses"]), r["mb"]))
                    print(f"[{time.monotonic() - started:.0f} s] {name}, pipeline {v.name}: {sps:.1f} samples/s, "
                          f"wire {r['wire']}, {r['mb']:.1f} MB through the links", flush=True)
                _table(f"{name}: pipeline of 3 experts, width {WIDTH}, batch {PIPELINE_BATCH}, {PIPELINE_STEPS} steps",
                       rows, PIPELINE_TARGET)
            if args.part in ("all", "diloco"):
                variants = _chosen(DILOCO, args)
                rows = []
                for i, v in enumerate(variants):
                    r = _diloco(link, v, Path(tmp), i)
                    reps = r["replicas"]
                    seconds = max(rep["times"][-1] for rep in reps)
                    sps = sum(len(rep["times"]) * rep["batch"] for rep in reps) / seconds
                    losses = [sum(pair) / 2 for pair in zip(*(rep["losses"] for rep in reps))]
                    times = [max(pair) for pair in zip(*(rep["times"] for rep in reps))]
                    rows.append((v.name, sps, _time_to(DILOCO_TARGET, times, losses), r["mb"]))
                    curve = [round(sum(losses[i:i + 10]) / len(losses[i:i + 10]), 2) for i in range(0, len(losses), 10)]
                    print(f"[{time.monotonic() - started:.0f} s] {name}, DiLoCo {v.name}: {sps:.1f} samples/s, groups "
                          f"{reps[0]['groups']}, {r['mb']:.1f} MB through the links, loss by 10 steps {curve}",
                          flush=True)
                _table(f"{name}: 2 DiLoCo replicas (data-parallel), width {WIDTH}, batch {DILOCO_BATCH} each", rows,
                       DILOCO_TARGET)
    print(f"\nwhole run: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
