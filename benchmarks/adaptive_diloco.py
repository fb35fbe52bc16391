"""DiLoCo with one slowed expert: total throughput of two pipeline replicas with adaptive batch sizing against without.

Six standalone experts (2 pipelines x 3 stages of a width-1024 MLP; one 'body' expert slowed 3 x by its test hook,
``expert.slowdown=3``) and two trainer processes (``tests/diloco_trainer.py``, batch 256, an outer round every 24
inner steps); runs with and without ``adaptive_batch_size`` alternate in one run. Throughput: samples both replicas
trained (each round's batch per step x inner steps) per second of training of the slower one. Every process runs with
OMP_NUM_THREADS=1.

The goal (>= 1.5) is about replicas on machines of their own: what a slow replica does not compute is then lost to
the swarm unless adaptive sizing gives the fast one more to do. ``--placement own-core`` (the default where there are
two cores or more) stands in for that on one machine: once the trainers have claimed their pipelines, each trainer
and the three experts it claimed (with their DHT processes, p2pd daemons and every thread) are pinned to a core of
their own (``sched_setaffinity``). ``--placement shared`` lets all of them
share every core, where a waiting replica's core time goes to the other one and adaptive sizing cannot pay.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/adaptive_diloco.py [--rounds 1] [--outer-rounds 6]
        [--placement own-core|shared]
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
H, BATCH, WIDTH = 24, 256, 1024


def _tree(pid: int) -> list[int]:
    """``pid`` and every process below it (read from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(parents.get(found[-1], []))
    return found


def _pin(pid: int, core: int) -> None:
    """Every thread of ``pid`` and of the processes below it (DHT process, p2pd, averager) to ``core``; threads and
    processes they start later inherit it."""
    for process in _tree(pid):
        try:
            tids = os.listdir(f"/proc/{process}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(int(tid), {core})
            except OSError:  # gone meanwhile
                pass


def _peer_of(log: Path, deadline: float) -> str:
    """The peer id an expert logged when it became ready."""
    while time.monotonic() < deadline:
        found = re.search(r"expert ready: .* as peer (\S+) on", log.read_text(errors="replace"))
        if found:
            return found.group(1)
        time.sleep(0.2)
    raise RuntimeError(f"no 'expert ready' line in {log}")


def _pin_replicas(trainers: list[subprocess.Popen], experts: dict[str, subprocess.Popen], cores: list[int],
                  logs: dict[str, Path]) -> None:
    """Once each trainer named its pipeline, pin it with its own three experts to its core (a machine of its own)."""
    from tests.helpers import wait_for_line

    deadline = time.monotonic() + 300
    peers = {_peer_of(logs[name], deadline): name for name in experts}
    for trainer, core in zip(trainers, cores):
        found, lines = wait_for_line(trainer, lambda line: line.startswith("PIPELINE "), 300)
        if not found:
            raise RuntimeError(f"a trainer named no pipeline: {lines[-5:]}")
        pipeline = json.loads(lines[-1].split(" ", 1)[1])
        _pin(trainer.pid, core)
        for peer in pipeline.values():
            _pin(experts[peers[peer]].pid, core)


def _run(adaptive: bool, outer_rounds: int, experiment_dir: Path,
         cores: Optional[list[int]]) -> tuple[float, list[float], list[int]]:
    """Returns (samples/s of both replicas together, the slow replica's inner seconds per round, its batches).
    ``cores``: the core of each replica's processes, or None to let them share all."""
    from lightning_distqat.swarm.dht import start_dht

    node = start_dht()
    peer = str(node.get_visible_maddrs()[0])
    script = Path(sys.executable).with_name("distqat-expert")
    experts: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    trainers: list[subprocess.Popen] = []
    try:
        for r in range(2):
            for stage in ("stem", "body", "head"):
                slowdown = 3.0 if (stage, r) == ("body", 0) else 1.0
                name = f"{stage}-{r}"
                logs[name] = experiment_dir / f"{name}.log"
                with open(logs[name], "wb") as log:
                    experts[name] = subprocess.Popen(
                        [str(script), "model._target_=tests.helpers.ThreeStageNet", "~model.arch",
                         "~model.num_classes", f"+model.width={WIDTH}", "expert.experiment=dl-test",
                         f"expert.stage={stage}", f"+expert.slowdown={slowdown}", f"expert.initial_peers=[{peer}]",
                         f"hydra.run.dir={experiment_dir}/{name}"],
                        cwd=experiment_dir, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        flags = ["--stages", f"--width={WIDTH}", f"--batch={BATCH}", "--mirror-every=0", f"--h={H}"]
        flags += ["--adaptive"] if adaptive else []
        trainers = [subprocess.Popen(
            [sys.executable, "-m", "tests.diloco_trainer", str(experiment_dir / f"p{r}.pt"), str(r),
             str(outer_rounds * H), peer, *flags],
            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for r in range(2)]
        if cores:
            _pin_replicas(trainers, experts, cores, logs)
        for t in trainers:
            if t.wait(timeout=600) != 0:
                raise RuntimeError(f"a trainer failed (exit code {t.returncode})")
    finally:
        for p in trainers + list(experts.values()):
            if p.poll() is None:
                p.send_signal(2)
        for p in trainers + list(experts.values()):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        node.shutdown()
    saved = [torch.load(experiment_dir / f"p{r}.pt", weights_only=False) for r in range(2)]
    samples = sum(H * r["batch_size"] for s in saved for r in s["reports"])
    seconds = max(s["seconds"] for s in saved)
    slow = max(saved, key=lambda s: s["reports"][1]["inner_seconds"])  # round 1 includes the warm-up
    return samples / seconds, [r["inner_seconds"] for r in slow["reports"]], [r["batch_size"] for r in slow["reports"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--outer-rounds", type=int, default=6)
    available = sorted(os.sched_getaffinity(0))
    parser.add_argument("--placement", choices=("own-core", "shared"),
                        default="own-core" if len(available) >= 2 else "shared")
    args = parser.parse_args()
    if args.placement == "own-core" and len(available) < 2:
        parser.error(f"--placement own-core needs 2 cores; this process may use {available}")
    cores = available[:2] if args.placement == "own-core" else None
    results: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for adaptive in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                sps, inner, batches = _run(adaptive, args.outer_rounds, Path(tmp), cores)
            results[adaptive].append(sps)
            print(f"adaptive={adaptive}: {sps:.0f} samples/s; slow replica inner seconds per round "
                  f"{[round(s, 2) for s in inner]}, batches {batches}", flush=True)
    without, with_ = statistics.median(results[False]), statistics.median(results[True])
    print(f"\n2 replicas x 3 stages (width {WIDTH}, batch {BATCH}, H={H}, {args.outer_rounds} outer rounds), one 'body' "
          f"expert slowed 3 x, median of {args.rounds}, OMP_NUM_THREADS=1 per process, placement "
          f"{args.placement}" + (f" (replica 0 on core {cores[0]}, replica 1 on core {cores[1]})" if cores else "")
          + "\n")
    print("| DiLoCo throughput | without adaptive sizing | with | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| samples/s, both replicas | {without:.0f} | {with_:.0f} | {with_ / without:.2f} |")


if __name__ == "__main__":
    main()
