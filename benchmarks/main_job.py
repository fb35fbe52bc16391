"""The main job (`make run`: ResNet-18 on digits through the embedded swarm) against the same job in one process
(`distqat-train strategy=local`), alternating in one run; samples/s of the training loop from each job's summary.json.
Every process runs with OMP_NUM_THREADS=1.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/main_job.py [--rounds 2]
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

JOBS = {"one process (strategy=local)": ["strategy=local"], "embedded swarm (make run)": []}


def _job(overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([str(Path(sys.executable).with_name("distqat-train")), f"hydra.run.dir={tmp}", *overrides],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)
        return json.loads((Path(tmp) / "summary.json").read_text())["samples_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[float]] = {name: [] for name in JOBS}
    for _ in range(args.rounds):
        for name, overrides in JOBS.items():
            results[name].append(_job(overrides))
            print(f"{name}: {results[name][-1]:.1f} samples/s", flush=True)
    local, swarm = (statistics.median(v) for v in results.values())
    print(f"\nmain job (distqat-train defaults), median of {args.rounds}, OMP_NUM_THREADS=1 per process\n")
    print("| one process (samples/s) | embedded swarm (samples/s) | ratio |")
    print("|---:|---:|---:|")
    print(f"| {local:.1f} | {swarm:.1f} | {swarm / local:.2f} |")


if __name__ == "__main__":
    main()
