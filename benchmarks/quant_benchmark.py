"""Quantization: wire codecs, pseudo-gradient codecs and QAT cost, measured side by side in one run.

1. The [foundation] example (ResNet-18 on digits, 4 embedded experts) trained for STEPS steps with each wire codec on
   activations and gradients: tensor bytes on the wire and the mean training loss of the last 10 steps, both divided
   by the fp32 run's, for SEEDS seeds (the loss ratio of a short run is dominated by run-to-run chaos: the fp32 runs
   of different seeds are printed for scale).
2. Pseudo-gradients: serialized bytes of ResNet-18's layer parameters (as a pseudo-gradient) with each codec divided
   by fp32, and the relative error of the decoded values.
3. QAT: training step time of an MLP stage (4 x Linear(w, w)) with torchao fake quantizers (int8-int4) divided by
   the float step time, for three sizes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quant_benchmark.py [--steps 30] [--seeds 2]
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from lightning_distqat import DataConfig, DistqatStrategy, QuantConfig, SharedMemoryDataModule  # noqa: E402
from lightning_distqat.models import ResNetClassifier  # noqa: E402

CODECS = ["none", "fp16", "bf16", "int8", "int4"]


def fit(codec: str, steps: int, seed: int) -> tuple[float, int]:
    pl.seed_everything(seed)
    data = SharedMemoryDataModule(DataConfig(source="sklearn-digits", image_size=32, val_fraction=0.15,
                                             batch_size=64, drop_last=True, seed=seed))
    model = ResNetClassifier("resnet18", num_classes=10, lr=0.05, max_steps=steps)
    losses: list[float] = []

    class _Losses(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    quant = QuantConfig(activations=codec, gradients="int8" if codec == "int4" else codec)
    strategy = DistqatStrategy(stages=ResNetClassifier.STAGES, quant=quant, experiment=f"qbench-{codec}-{seed}")
    pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, strategy=strategy, logger=False, limit_val_batches=0,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               callbacks=[_Losses()]).fit(model, datamodule=data)
    wire = strategy.wire_bytes()
    return statistics.mean(losses[-10:]), wire["bytes_sent"] + wire["bytes_received"]


def pseudo_gradients() -> list[tuple[str, float, float]]:
    from hivemind.compression import CompressionInfo, deserialize_torch_tensor

    from lightning_distqat.diloco.compression import pseudo_gradient_compression

    import torchvision

    net = torchvision.models.resnet18(weights=None, num_classes=10)
    delta = torch.cat([p.detach().reshape(-1) for n, p in net.named_parameters() if n.startswith("layer")]) * 1e-2
    base = None
    rows = []
    for codec in ("none", "fp16", "int8", "int4"):
        compression = pseudo_gradient_compression(codec, 32 if codec == "int4" else 256)
        serialized = compression.compress(delta, CompressionInfo.from_tensor(delta))
        size = len(serialized.buffer)
        base = base or size
        restored = deserialize_torch_tensor(serialized)
        rows.append((codec, size / base, float((restored - delta).norm() / delta.norm())))
    return rows


def qat_step_ratio(width: int, batch: int, steps: int = 20) -> tuple[float, float]:
    from lightning_distqat.quant.qat import prepare

    torch.set_num_threads(1)
    x, y = torch.randn(batch, width), torch.randint(0, 10, (batch,))

    def timed(model: torch.nn.Module) -> float:
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for i in range(steps + 5):
            if i == 5:
                start = time.perf_counter()
            loss = F.cross_entropy(model(x)[:, :10], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (time.perf_counter() - start) / steps

    def mlp() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Linear(width, width), torch.nn.GELU())])

    floats, qats = [], []
    for _ in range(3):  # alternate
        floats.append(timed(mlp()))
        qats.append(timed(prepare(mlp(), "int8-int4", 32)))
    return statistics.median(floats), statistics.median(qats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results: dict[str, list[tuple[float, int]]] = {c: [] for c in CODECS}
    for seed in range(args.seeds):
        for codec in CODECS:
            results[codec].append(fit(codec, args.steps, seed))
            print(f"  seed {seed} {codec}: loss {results[codec][-1][0]:.4f}, {results[codec][-1][1] / 1e6:.1f} MB",
                  flush=True)
    print(f"\n| wire codec (activations/gradients) | bytes / fp32 | loss / fp32 (mean of {args.seeds} seeds) | "
          f"per-seed loss ratios |")
    print("|---|---:|---:|---|")
    for codec in CODECS:
        b = statistics.mean(r[1] / f[1] for r, f in zip(results[codec], results["none"]))
        ratios = [r[0] / f[0] for r, f in zip(results[codec], results["none"])]
        label = {"none": "fp32", "int4": "int4/int8"}.get(codec, f"{codec}/{codec}")
        print(f"| {label} | {b:.3f} | {statistics.mean(ratios):.3f} | {', '.join(f'{x:.3f}' for x in ratios)} |")
    fp32 = [f[0] for f in results["none"]]
    print(f"\nfp32 loss of the seeds, for scale: {', '.join(f'{x:.4f}' for x in fp32)}")
    print("\n| pseudo-gradient codec | bytes / fp32 | relative error |")
    print("|---|---:|---:|")
    for codec, ratio, err in pseudo_gradients():
        print(f"| {codec} | {ratio:.3f} | {err:.2e} |")
    print("\n| QAT int8-int4 stage: 4 x Linear(w, w) | batch (tokens) | float step (ms) | QAT step (ms) | ratio |")
    print("|---|---:|---:|---:|---:|")
    for width, batch in ((512, 256), (1024, 512), (2048, 512)):
        f, q = qat_step_ratio(width, batch)
        print(f"| w = {width} | {batch} | {f * 1e3:.1f} | {q * 1e3:.1f} | {q / f:.2f} |")


if __name__ == "__main__":
    main()
