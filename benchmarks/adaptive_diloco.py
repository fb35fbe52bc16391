"""DiLoCo with one slowed expert: total throughput of two pipeline replicas with adaptive batch sizing against without.

Six standalone experts (2 pipelines x 3 stages of a width-1024 MLP; one 'body' expert slowed 3 x by its test hook,
``expert.slowdown=3``) and two trainer processes (``tests/diloco_trainer.py``, batch 256, an outer round every 24
inner steps); runs with and without ``adaptive_batch_size`` alternate in one run. Throughput: samples both replicas
trained (each round's batch per step x inner steps) per second of training of the slower one. Every process runs with
OMP_NUM_THREADS=1.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/adaptive_diloco.py [--rounds 1] [--outer-rounds 6]
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
H, BATCH, WIDTH = 24, 256, 1024


def _run(adaptive: bool, outer_rounds: int, experiment_dir: Path) -> tuple[float, list[float], list[int]]:
    """Returns (samples/s of both replicas together, the slow replica's inner seconds per round, its batches)."""
    from lightning_distqat.swarm.dht import start_dht

    node = start_dht()
    peer = str(node.get_visible_maddrs()[0])
    script = Path(sys.executable).with_name("distqat-expert")
    experts, trainers = [], []
    try:
        for r in range(2):
            for stage in ("stem", "body", "head"):
                slowdown = 3.0 if (stage, r) == ("body", 0) else 1.0
                experts.append(subprocess.Popen(
                    [str(script), "model._target_=tests.helpers.ThreeStageNet", "~model.arch", "~model.num_classes",
                     f"+model.width={WIDTH}", "expert.experiment=dl-test", f"expert.stage={stage}",
                     f"+expert.slowdown={slowdown}", f"expert.initial_peers=[{peer}]",
                     f"hydra.run.dir={experiment_dir}/{stage}-{r}"],
                    cwd=experiment_dir, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        flags = ["--stages", f"--width={WIDTH}", f"--batch={BATCH}", "--mirror-every=0", f"--h={H}"]
        flags += ["--adaptive"] if adaptive else []
        trainers = [subprocess.Popen(
            [sys.executable, "-m", "tests.diloco_trainer", str(experiment_dir / f"p{r}.pt"), str(r),
             str(outer_rounds * H), peer, *flags],
            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for r in range(2)]
        for t in trainers:
            if t.wait(timeout=600) != 0:
                raise RuntimeError(f"a trainer failed (exit code {t.returncode})")
    finally:
        for p in trainers + experts:
            if p.poll() is None:
                p.send_signal(2)
        for p in trainers + experts:
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
    args = parser.parse_args()
    results: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for adaptive in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                sps, inner, batches = _run(adaptive, args.outer_rounds, Path(tmp))
            results[adaptive].append(sps)
            print(f"adaptive={adaptive}: {sps:.0f} samples/s; slow replica inner seconds per round "
                  f"{[round(s, 2) for s in inner]}, batches {batches}", flush=True)
    without, with_ = statistics.median(results[False]), statistics.median(results[True])
    print(f"\n2 replicas x 3 stages (width {WIDTH}, batch {BATCH}, H={H}, {args.outer_rounds} outer rounds), one 'body' "
          f"expert slowed 3 x, median of {args.rounds}, OMP_NUM_THREADS=1 per process\n")
    print("| DiLoCo throughput | without adaptive sizing | with | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| samples/s, both replicas | {without:.0f} | {with_:.0f} | {with_ / without:.2f} |")


if __name__ == "__main__":
    main()
