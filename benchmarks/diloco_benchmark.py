"""DiLoCo benchmarks.

(1) Communication: two replicas in two processes average through the same hivemind averager (DiLoCoSync) either
    every inner step (H=1, the cost of synchronous averaging) or every H steps. Prints payload bytes and loopback
    bytes (from /proc/net/dev) per inner step, and their ratio to every-step averaging (expect about 1/H).
(2) Quality: final loss of DiLoCo(H) divided by synchronous data parallelism at equal samples, on a small
    character-level LM over a local text corpus (Python's own pydoc topics, shipped with every Python), 2 replicas.
    The replicas run in one process and average exactly (OuterState, the code the experts run); the network only
    adds float rounding, which (1) exercises.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diloco_benchmark.py [--steps 600]
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import copy  # noqa: E402
import logging  # noqa: E402
import multiprocessing as mp  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lightning_distqat.diloco.config import DiLoCoConfig  # noqa: E402
from lightning_distqat.diloco.outer import OuterState  # noqa: E402
from lightning_distqat.diloco.sync import DiLoCoSync  # noqa: E402


# ---------------------------------------------------------------------- data and model
def corpus() -> torch.Tensor:
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    return torch.tensor(list(text.encode("ascii", "replace")), dtype=torch.long)


class CharLM(nn.Module):
    def __init__(self, vocab: int = 128, dim: int = 64, layers: int = 2, context: int = 48) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(context, dim))
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(dim, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        return self.out(self.blocks(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True))


def batches(data: torch.Tensor, n: int, batch: int, context: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randint(0, len(data) - context - 1, (batch,), generator=g)
        chunk = torch.stack([data[i : i + context + 1] for i in idx.tolist()])
        out.append((chunk[:, :-1], chunk[:, 1:]))
    return out


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x).reshape(-1, 128), y.reshape(-1))


def inner_opt(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))


# ---------------------------------------------------------------------- (2) quality
def train_sync_dp(base: nn.Module, shards: list, steps: int) -> nn.Module:
    model = copy.deepcopy(base)
    opt = inner_opt(model)
    for t in range(steps):
        opt.zero_grad()
        for shard in shards:  # the mean of the replicas' gradients, as DDP computes it
            (loss_of(model, *shard[t]) / len(shards)).backward()
        opt.step()
    return model


def train_diloco(base: nn.Module, shards: list, steps: int, H: int, outer_momentum: float) -> nn.Module:
    replicas = [copy.deepcopy(base) for _ in shards]
    opts = [inner_opt(m) for m in replicas]
    config = DiLoCoConfig(inner_steps=H, outer_momentum=outer_momentum)
    states = [OuterState(list(m.parameters()), config) for m in replicas]
    for t in range(steps):
        for model, opt, shard in zip(replicas, opts, shards):
            opt.zero_grad()
            loss_of(model, *shard[t]).backward()
            opt.step()
        if (t + 1) % H == 0 or t + 1 == steps:
            pseudo = [s.pseudo_gradients() for s in states]
            mean = [sum(p[j] for p in pseudo) / len(pseudo) for j in range(len(pseudo[0]))]
            for s in states:
                s.apply(mean)
    return replicas[0]


@torch.no_grad()
def eval_loss(model: nn.Module, held_out: list) -> float:
    return sum(float(loss_of(model, x, y)) for x, y in held_out) / len(held_out)


# ---------------------------------------------------------------------- (1) communication
def _lo_bytes() -> int:
    with open("/proc/net/dev") as f:
        for line in f:
            if line.strip().startswith("lo:"):
                fields = line.split(":", 1)[1].split()
                return int(fields[0]) + int(fields[8])
    return 0


def _replica(rank: int, peers: list, H: int, steps: int, conn) -> None:  # noqa: ANN001
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.INFO)
    from lightning_distqat.swarm.dht import start_dht

    dht = start_dht(peers or None)
    if rank == 0:
        conn.send([str(m) for m in dht.get_visible_maddrs()])
    torch.manual_seed(0)
    model = CharLM()
    data = corpus()
    shard = batches(data, steps, 16, 48, seed=rank)
    opt = inner_opt(model)
    sync = DiLoCoSync(list(model.parameters()), DiLoCoConfig(inner_steps=H, matchmaking_time=1.0,
                                                             averaging_timeout=30.0),
                      dht=dht, prefix=f"bench-h{H}").start()
    conn.send("ready")
    conn.recv()  # both ready: go
    for t in range(steps):
        opt.zero_grad()
        loss_of(model, *shard[t]).backward()
        opt.step()
        if (t + 1) % H == 0:
            sync.round(16)
    conn.send([(r.group_size, r.bytes_sent, r.bytes_received) for r in sync.reports])
    sync.shutdown()
    dht.shutdown()


def communication(H: int, steps: int) -> tuple[float, float, int]:
    """Payload and loopback bytes per inner step for DiLoCo(H) with 2 replicas; rounds that had a full group."""
    ctx = mp.get_context("fork")  # hivemind's DHT and averager processes are built for fork
    (a_parent, a_child), (b_parent, b_child) = ctx.Pipe(), ctx.Pipe()
    a = ctx.Process(target=_replica, args=(0, [], H, steps, a_child))
    a.start()
    peers = a_parent.recv()
    b = ctx.Process(target=_replica, args=(1, peers, H, steps, b_child))
    b.start()
    assert a_parent.recv() == "ready" and b_parent.recv() == "ready"
    lo_before = _lo_bytes()
    a_parent.send("go")
    b_parent.send("go")
    reports = a_parent.recv() + b_parent.recv()
    lo = _lo_bytes() - lo_before
    a.join(30)
    b.join(30)
    payload = sum(sent + received for _, sent, received in reports) / 2  # per replica
    full = sum(1 for size, _, _ in reports if size == 2) // 2
    return payload / steps, lo / 2 / steps, full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="inner steps per replica for the quality runs")
    parser.add_argument("--comm-steps", type=int, default=30, help="inner steps per replica for the bytes runs")
    parser.add_argument("--outer-momentum", type=float, nargs="+", default=[0.9, 0.5],
                        help="outer momentum values to compare (0.9 is DiLoCoConfig's default)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    print("(1) bytes per inner step, 2 replicas, CharLM "
          f"({sum(p.numel() for p in CharLM().parameters()) / 1e6:.2f} M params)", flush=True)
    rows = []
    for H in (1, 10):
        start = time.perf_counter()
        payload, loopback, full = communication(H, args.comm_steps)
        rows.append((H, payload, loopback, full))
        print(f"  H={H}: {payload / 1e6:.2f} MB payload, {loopback / 1e6:.2f} MB loopback per step, "
              f"{full} full rounds ({time.perf_counter() - start:.0f}s)", flush=True)
    print("\n| averaging | payload MB/step | loopback MB/step | ratio to every-step (payload) | ratio (loopback) |")
    print("|---|---:|---:|---:|---:|")
    for H, payload, loopback, _ in rows:
        print(f"| {'every step' if H == 1 else f'DiLoCo H={H}'} | {payload / 1e6:.2f} | {loopback / 1e6:.2f} | "
              f"{payload / rows[0][1]:.3f} | {loopback / rows[0][2]:.3f} |")

    print(f"\n(2) final held-out loss, 2 replicas x {args.steps} inner steps (batch 16 x 48 chars each)", flush=True)
    data = corpus()
    split = int(len(data) * 0.9)
    train, held = data[:split], data[split:]
    shards = [batches(train, args.steps, 16, 48, seed=s) for s in (1, 2)]
    held_out = batches(held, 20, 32, 48, seed=99)
    torch.manual_seed(0)
    base = CharLM()
    sync_loss = eval_loss(train_sync_dp(base, shards, args.steps), held_out)
    print(f"  synchronous data parallel: {sync_loss:.4f}", flush=True)
    results = []
    for momentum in args.outer_momentum:
        for H in (1, 10, 50):
            loss = eval_loss(train_diloco(base, shards, args.steps, H, momentum), held_out)
            results.append((H, momentum, loss))
            print(f"  DiLoCo H={H}, outer momentum {momentum}: {loss:.4f}", flush=True)
    print("\n| method | held-out loss | ratio to synchronous DP |")
    print("|---|---:|---:|")
    print(f"| synchronous DP | {sync_loss:.4f} | 1.000 |")
    for H, momentum, loss in results:
        print(f"| DiLoCo H={H} (Nesterov, lr 0.7, momentum {momentum}) | {loss:.4f} | {loss / sync_loss:.3f} |")


if __name__ == "__main__":
    main()
