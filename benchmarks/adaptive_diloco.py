"""DiLoCo with one slowed expert: total throughput of two pipeline replicas with adaptive batch sizing against without.

Six standalone experts (2 pipelines x 3 stages of a width-2048 MLP; one 'body' expert slowed 3 x by its test hook,
``expert.slowdown=3``) and two trainer processes (``tests/diloco_trainer.py``, batch 256, an outer round every 48
inner steps, 8 rounds); runs with and without ``adaptive_batch_size`` alternate in one run. Throughput: samples both
replicas trained (each round's batch per step x inner steps) per second of training of the slower one, over the
whole run and after round 4 (the steady state a long run sees: round 1 is the warm-up, the damped adaptation takes
two more). Every process runs with OMP_NUM_THREADS=1.

The goal (>= 1.5) is about replicas on machines of their own: what a slow replica does not compute is then lost to
the swarm unless adaptive sizing gives the fast one more to do. ``--placement own-core`` (the default where there are
two cores or more) stands in for that on one machine: once the trainers have claimed their pipelines, each trainer
and the three experts it claimed (with their DHT processes, p2pd daemons and every thread) are pinned to a core of
their own (``sched_setaffinity``). ``--placement shared`` lets all of them share every core, where a waiting
replica's core time goes to the other one and adaptive sizing cannot pay.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/adaptive_diloco.py [--rounds 1] [--outer-rounds 8] [--settle 4]
        [--h 48] [--width 2048] [--placement own-core|shared]
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
from typing import Any, Optional  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
H, BATCH, WIDTH = 48, 256, 2048


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


def _run(adaptive: bool, outer_rounds: int, experiment_dir: Path, cores: Optional[list[int]],
         settle: int) -> dict[str, Any]:
    """Samples/s of both replicas together over the whole run and after round ``settle``, the slow replica's
    slowness at full batch (round 2), both replicas' inner seconds per round and the slow one's batches. ``cores``:
    the core of each replica's processes, or None to let them share all."""
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
    slow = max(saved, key=lambda s: s["reports"][1]["inner_seconds"])  # round 1 includes the warm-up
    fast = saved[1] if slow is saved[0] else saved[0]
    samples = [sum(H * r["batch_size"] for s in saved for r in s["reports"][first:]) for first in (0, settle)]
    steady_seconds = max(s["round_ends"][-1] for s in saved) - max(s["round_ends"][settle - 1] for s in saved)
    return {
        "whole": samples[0] / max(s["seconds"] for s in saved),
        "steady": samples[1] / steady_seconds,
        "slowness": slow["reports"][1]["inner_seconds"] / fast["reports"][1]["inner_seconds"],
        "slow_inner": [r["inner_seconds"] for r in slow["reports"]],
        "fast_inner": [r["inner_seconds"] for r in fast["reports"]],
        "batches": [r["batch_size"] for r in slow["reports"]],
    }


def main() -> None:
    global H, WIDTH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--outer-rounds", type=int, default=8)
    parser.add_argument("--settle", type=int, default=4,
                        help="rounds left out of the steady figure (warm-up, first pace, the damped adaptation)")
    available = sorted(os.sched_getaffinity(0))
    parser.add_argument("--placement", choices=("own-core", "shared"),
                        default="own-core" if len(available) >= 2 else "shared")
    parser.add_argument("--h", type=int, default=H, help="inner steps per outer round")
    parser.add_argument("--width", type=int, default=WIDTH)
    args = parser.parse_args()
    H, WIDTH = args.h, args.width
    if args.placement == "own-core" and len(available) < 2:
        parser.error(f"--placement own-core needs 2 cores; this process may use {available}")
    cores = available[:2] if args.placement == "own-core" else None
    settle = args.settle
    if not 2 <= settle < args.outer_rounds:
        parser.error(f"--settle must be in [2, --outer-rounds), got {settle}")
    results: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for _ in range(args.rounds):
        for adaptive in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                run = _run(adaptive, args.outer_rounds, Path(tmp), cores, settle)
            results[adaptive].append(run)
            print(f"adaptive={adaptive}: {run['whole']:.0f} samples/s (after round {settle}: {run['steady']:.0f}); "
                  f"slow replica {run['slowness']:.2f} x the fast one at full batch; inner seconds per round: slow "
                  f"{[round(x, 2) for x in run['slow_inner']]}, fast {[round(x, 2) for x in run['fast_inner']]}; "
                  f"slow replica's batches {run['batches']}", flush=True)

    def median(adaptive: bool, key: str) -> float:
        return statistics.median(r[key] for r in results[adaptive])

    slowness = statistics.median(r["slowness"] for runs in results.values() for r in runs)
    print(f"\n2 replicas x 3 stages (width {WIDTH}, batch {BATCH}, H={H}, {args.outer_rounds} outer rounds), one 'body' "
          f"expert slowed 3 x, median of {args.rounds}, OMP_NUM_THREADS=1 per process, placement "
          f"{args.placement}" + (f" (replica 0 on core {cores[0]}, replica 1 on core {cores[1]})" if cores else "")
          + "\n")
    print("| DiLoCo throughput, both replicas | without adaptive sizing | with | ratio |")
    print("|---|---:|---:|---:|")
    for key, label in (("whole", "whole run (samples/s)"), ("steady", f"after round {settle} (samples/s)")):
        without, with_ = median(False, key), median(True, key)
        print(f"| {label} | {without:.0f} | {with_:.0f} | {with_ / without:.2f} |")
    print(f"\nThe slow replica took {slowness:.2f} x the fast one's time per inner phase at full batch; the most adaptive "
          f"sizing can gain is (1 + {slowness:.2f}) / 2 = {(1 + slowness) / 2:.2f} x (the slow replica's batch shrinks "
          "to its pace, the fast one no longer waits), less the rounds' own time and what a smaller batch does not "
          "save of a step.")


if __name__ == "__main__":
    main()
