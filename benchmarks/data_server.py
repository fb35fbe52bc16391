"""The shared-memory data server against the usual ways of feeding a trainer.

An image dataset (the digits, scaled to SIZE x SIZE RGB, stored as PNGs in an arrow folder like any Hugging Face image
dataset) feeds a small CNN. Every variant runs in its own process with OMP_NUM_THREADS=1, alternating, ROUNDS times:

- preloaded: the whole dataset transformed to tensors in the trainer's memory first (no loading while training);
- dataloader: ``torch.utils.data.DataLoader(num_workers=1)`` with the same transform per sample;
- server: the shared-memory data server (a child process, as SharedMemoryDataModule starts it) with acknowledgements.

Then memory, with glibc's default allocator settings: proportional set size (PSS, shared pages split between
processes) of 3 trainers that each preload the dataset, against 3 trainers fed by one server (server included), minus
3 trainers that hold no data.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_server.py [--images 6000] [--steps 60] [--rounds 2]
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
import time  # noqa: E402
from pathlib import Path  # noqa: E402

SIZE = 64
BATCH = 64
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(128 << 20)}
"""The same glibc allocator settings for every trainer. With the defaults, a fresh process maps and unmaps every
activation buffer above 128 KiB at each step (page faults cost ~25% of this CNN's step) until a large free raises the
threshold, so a trainer that happened to preload a dataset would train faster for reasons that have nothing to do
with how it is fed."""


def _config(data_dir: str, **kw):
    from lightning_distqat import DataConfig

    return DataConfig(source=data_dir, task="image_classification", image_size=SIZE, channels=3, batch_size=BATCH,
                      shuffle_buffer=100_000, seed=0, **kw)


def make_dataset(path: Path, n: int) -> None:
    import datasets
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(n):
        gray = Image.fromarray((digits.images[i % len(digits.images)] * 16).astype(np.uint8)).resize((SIZE, SIZE))
        tint = rng.uniform(0.5, 1.0, size=3)
        rgb = (np.asarray(gray, dtype=np.float32)[..., None] * tint).astype(np.uint8)
        images.append(Image.fromarray(rgb, mode="RGB"))
        labels.append(int(digits.target[i % len(digits.target)]))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(path))


def _model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, 10))


def _pss_kib(pid: int, field: str = "Pss") -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))


def worker(mode: str, data_dir: str, steps: int, trainer_id: int, num_trainers: int, address: str | None) -> None:
    """One trainer: train ``steps`` steps from ``mode``'s data, print samples/s, then (when measured) wait on stdin."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cleanup = []

    if mode == "idle":
        x, y = torch.randn(BATCH, 3, SIZE, SIZE), torch.randint(0, 10, (BATCH,))
        batches = iter(lambda: {"pixel_values": x, "labels": y}, None)
    elif mode == "preloaded":
        from lightning_distqat.data.sources import load_splits
        from lightning_distqat.data.tasks import make_collate

        cfg = _config(data_dir)
        ds = load_splits(cfg).train
        collate = make_collate(cfg, ds.column_names)
        parts = [collate(ds[i:i + 512]) for i in range(0, len(ds), 512)]
        x = torch.from_numpy(np.concatenate([p["pixel_values"] for p in parts]))
        y = torch.from_numpy(np.concatenate([p["labels"] for p in parts]))

        def preloaded():
            while True:
                for idx in torch.randperm(len(y)).split(BATCH):
                    yield {"pixel_values": x[idx], "labels": y[idx]}

        batches = preloaded()
    elif mode == "dataloader":
        from torch.utils.data import DataLoader, Dataset

        from lightning_distqat.data.sources import load_splits
        from lightning_distqat.data.tasks import make_collate

        cfg = _config(data_dir)
        ds = load_splits(cfg).train
        collate = make_collate(cfg, ds.column_names)

        class Rows(Dataset):
            def __len__(self):
                return len(ds)

            def __getitem__(self, i):
                one = collate(ds[i:i + 1])
                return {k: v[0] for k, v in one.items()}

        loader = DataLoader(Rows(), batch_size=BATCH, shuffle=True, num_workers=1, persistent_workers=True)

        def from_loader():
            while True:
                yield from loader

        batches = from_loader()
    elif mode == "server":
        from lightning_distqat.data.client import DataClient
        from lightning_distqat.data.embedded import EmbeddedDataServer

        if address is None:
            server = EmbeddedDataServer(_config(data_dir, num_trainers=num_trainers))
            address = server.start()
            cleanup.append(server.shutdown)
        client = DataClient(address, trainer_id).connect(timeout=120)
        cleanup.append(client.close)

        def from_server():
            for epoch in range(1000):
                client.start("train", epoch)
                for index, batch in client.batches():
                    yield batch
                    client.ack(epoch, index)

        batches = from_server()
    else:
        raise SystemExit(f"unknown mode {mode}")

    def step(batch):
        loss = F.cross_entropy(model(batch["pixel_values"]), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(5):
        step(next(batches))
    start = time.perf_counter()
    waited = 0.0
    for _ in range(steps):
        t = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - t
        step(batch)
    seconds = time.perf_counter() - start
    print(json.dumps({"samples_per_s": steps * BATCH / seconds, "wait_ms": waited / steps * 1000,
                      "pid": os.getpid()}), flush=True)
    if sys.stdin is not None and not sys.stdin.isatty():
        sys.stdin.readline()  # the parent measures memory now, then lets go
    for fn in reversed(cleanup):
        fn()


def _spawn(mode: str, data_dir: str, steps: int, trainer_id: int = 0, num_trainers: int = 1,
           address: str | None = None, malloc: bool = True) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", mode, "--data", data_dir, "--steps", str(steps),
           "--trainer-id", str(trainer_id), "--num-trainers", str(num_trainers)]
    if address:
        cmd += ["--address", address]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(MALLOC if malloc else {})})


def _result(process: subprocess.Popen) -> dict:
    line = process.stdout.readline()
    if not line:
        raise SystemExit(f"benchmark worker {process.args[3]} failed (exit code {process.wait()})")
    return json.loads(line)


def _finish(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        p.stdin.close()
    for p in processes:
        p.wait(timeout=120)


def throughput(data_dir: str, steps: int, rounds: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"preloaded": [], "dataloader": [], "server": []}
    for r in range(rounds):
        for mode in results:
            p = _spawn(mode, data_dir, steps)
            results[mode].append(_result(p)["samples_per_s"])
            _finish([p])
            print(f"  round {r + 1}/{rounds} {mode}: {results[mode][-1]:.0f} samples/s", flush=True)
    return results


def memory(data_dir: str, steps: int) -> dict[str, float]:
    """Total PSS in MiB of 3 trainers in each setup (the server's process counted with its trainers), and the PSS of a
    server process that holds (almost) no data."""
    from lightning_distqat import DataConfig
    from lightning_distqat.data.embedded import EmbeddedDataServer

    totals = {"shared": 0.0}
    empty = EmbeddedDataServer(DataConfig(source="sklearn-digits", image_size=8, name=f"bench-empty-{os.getpid()}"))
    empty.start()
    try:
        totals["empty_server"] = _pss_kib(empty.pid) / 1024  # alone: no trainer shares its libraries
    finally:
        empty.shutdown()
    for mode in ("idle", "preloaded"):
        procs = [_spawn(mode, data_dir, steps, malloc=False) for _ in range(3)]
        pids = [_result(p)["pid"] for p in procs]
        totals[mode] = sum(_pss_kib(pid) for pid in pids) / 1024
        _finish(procs)
    server = EmbeddedDataServer(_config(data_dir, num_trainers=3, name=f"bench-{os.getpid()}"))
    address = server.start()  # the child process that SharedMemoryDataModule starts
    try:
        procs = [_spawn("server", data_dir, steps, tid, 3, address, malloc=False) for tid in range(3)]
        pids = [_result(p)["pid"] for p in procs]
        totals["server"] = (sum(_pss_kib(pid) for pid in pids) + _pss_kib(server.pid)) / 1024
        totals["shared"] = sum(_pss_kib(pid, "Pss_Shmem") for pid in [*pids, server.pid]) / 1024
        totals["server_process"] = _pss_kib(server.pid) / 1024
        _finish(procs)
    finally:
        server.shutdown()
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory-only", action="store_true", help="skip the throughput rounds")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--trainer-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--num-trainers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--address", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.data, args.steps, args.trainer_id, args.num_trainers, args.address)
        return

    with tempfile.TemporaryDirectory(prefix="distqat-bench-") as tmp:
        data_dir = str(Path(tmp) / "images")
        print(f"Writing {args.images} {SIZE}x{SIZE} RGB PNGs to an arrow dataset...", flush=True)
        make_dataset(Path(data_dir), args.images)
        tp = {}
        if not args.memory_only:
            print(f"Training a small CNN, batch {BATCH}, {args.steps} timed steps, {args.rounds} rounds:", flush=True)
            tp = throughput(data_dir, args.steps, args.rounds)
        print("Memory of 3 trainers:", flush=True)
        mem = memory(data_dir, max(10, args.steps // 3))

    copy_mib = args.images * 3 * SIZE * SIZE * 4 / 2**20
    if tp:
        med = {k: statistics.median(v) for k, v in tp.items()}
        print(f"\n| feeding | samples/s (median of {args.rounds}) | server / this |")
        print("|---|---:|---:|")
        for mode in ("preloaded", "dataloader", "server"):
            print(f"| {mode} | {med[mode]:.0f} | {med['server'] / med[mode]:.3f} |")
    print(f"\n| 3 trainers | total PSS (MiB) | over 3 trainers without data (MiB) | as decoded-dataset sizes "
          f"({copy_mib:.0f} MiB) |")
    print("|---|---:|---:|---:|")
    for mode, label in (("idle", "no data (reference)"), ("preloaded", "each preloads the dataset"),
                        ("server", "one shared-memory server (its process included)")):
        extra = mem[mode] - mem["idle"]
        print(f"| {label} | {mem[mode]:.0f} | {extra:.0f} | {extra / copy_mib:.2f} |")
    extra = (mem["server"] - mem["idle"]) / copy_mib
    print(f"\nWith the server, shared memory holds {mem['shared']:.0f} MiB ({mem['shared'] / copy_mib:.2f} copies of the "
          f"decoded dataset, mapped by all 4 processes); the server process itself is {mem['server_process']:.0f} MiB "
          f"PSS (Python and numpy: a loader process that has exited transformed the data). A server holding no data, alone: "
          f"{mem['empty_server']:.0f} MiB PSS (goal <= 300: {'met' if mem['empty_server'] <= 300 else 'NOT met'}). "
          f"3 trainers and the server above 3 trainers without data: {extra:.2f} dataset sizes (goal <= 1.5: "
          f"{'met' if extra <= 1.5 else 'NOT met'}).")


if __name__ == "__main__":
    main()
