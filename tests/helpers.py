"""Test helpers: small models and data, plain-Lightning references, and process bookkeeping."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any, Callable, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


# ---------------------------------------------------------------------- processes
def children_of(pid: int) -> set[int]:
    """All live descendants of ``pid`` (from /proc), zombies excluded."""
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            for kid in kids:
                if kid not in found and not _is_zombie(kid):
                    found.add(kid)
                    frontier.append(kid)
    return found


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def p2pd_pids() -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == "p2pd" and not _is_zombie(int(entry)):
                        pids.add(int(entry))
            except OSError:
                pass
    return pids


def shm_entries() -> set[str]:
    try:
        return {e for e in os.listdir("/dev/shm") if not e.startswith("sem.mp-")}
    except OSError:
        return set()


def wire_slot_alive(entry: str) -> bool:
    """Whether ``entry`` is a shared-memory slot (``distqat_wire_<pid>_<n>``) whose owner still runs."""
    if not entry.startswith("distqat_wire_"):
        return False
    pid = entry.removeprefix("distqat_wire_").split("_")[0]
    return pid.isdigit() and os.path.exists(f"/proc/{pid}")


def describe(pids: set[int]) -> list[str]:
    out = []
    for pid in sorted(pids):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            out.append(f"{pid}: {cmdline[:160]}")
        except OSError:
            out.append(f"{pid}: (gone)")
    return out


def wait_gone(pids: set[int], seconds: float) -> set[int]:
    """Poll until none of ``pids`` is a live process, at most ``seconds``; returns those still alive."""
    import threading
    import time

    deadline, poll = time.monotonic() + seconds, threading.Event()
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in alive if os.path.exists(f"/proc/{pid}") and not _is_zombie(pid)}
        poll.wait(0.2)
    return alive


def torch_segments_of(pids: set[int]) -> list[str]:
    """/dev/shm segments that torch created for any of ``pids``."""
    return [e for e in shm_entries() if e.startswith("torch_") and e.split("_")[1].isdigit()
            and int(e.split("_")[1]) in pids]


def kill_pids(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def interrupt_all(processes: Sequence[subprocess.Popen], timeout: float = 30) -> None:
    """SIGINT to every process still running (a clean stop), then wait; SIGKILL what does not stop in ``timeout``."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ---------------------------------------------------------------------- models and data
class ThreeStageNet(pl.LightningModule):
    """stem -> body -> head, with one local parameter outside every stage."""

    def __init__(self, optimizer: str = "sgd", scheduler: bool = False, width: int = 32) -> None:
        super().__init__()
        self.optimizer_name, self.use_scheduler = optimizer, scheduler
        self.stem = nn.Sequential(nn.Linear(16, width), nn.Tanh())
        self.body = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
        self.head = nn.Linear(width, 4)
        self.temperature = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x))) * self.temperature

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("val_loss", loss)
        return loss

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        elif self.optimizer_name == "adamw":
            opt = torch.optim.AdamW(
                [
                    {"params": [p for n, p in self.named_parameters() if n.endswith("weight")]},
                    {"params": [p for n, p in self.named_parameters() if not n.endswith("weight")], "lr": 3e-3},
                ],
                lr=1e-2, weight_decay=0.05,
            )
        else:
            raise ValueError(self.optimizer_name)
        if not self.use_scheduler:
            return opt
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)}


_unread: dict[int, str] = {}
"""Output read from a child past the line ``wait_for_line`` returned, by pid (the next call starts there)."""


def wait_for_line(process: subprocess.Popen, wanted: Callable[[str], bool], seconds: float) -> tuple[bool, list[str]]:
    """Read ``process``'s stdout (a pipe) until a line for which ``wanted(line)`` holds: ``(True, lines so far)``,
    or ``(False, lines)`` when the output ended or ``seconds`` passed. Reads the pipe's file descriptor itself: a
    buffered ``readline`` after ``select`` can leave a line in Python's buffer, unseen until more output comes."""
    import select
    import time

    fd, seen = process.stdout.fileno(), []
    buffer = _unread.pop(process.pid, "")
    deadline = time.monotonic() + seconds
    while True:
        while "\n" in buffer:
            line, buffer = buffer.split("\n", 1)
            seen.append(line + "\n")
            if wanted(line):
                _unread[process.pid] = buffer
                return True, seen
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False, seen
        if select.select([fd], [], [], min(1.0, remaining))[0]:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return False, seen + ([buffer] if buffer else [])
            buffer += chunk.decode(errors="replace")


def toy_loader(n: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    """A learnable toy task: 16 features, the label is the argmax of a fixed linear map (the same for every seed)."""
    teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x @ teacher).argmax(-1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def fit_params(make_model: Callable[[], pl.LightningModule], loader_fn=toy_loader, **trainer_kwargs: Any):
    """Seeded model, fitted; returns ``(model, trainer)``."""
    pl.seed_everything(0, verbose=False)
    model = make_model()
    trainer = quiet_trainer(**trainer_kwargs)
    trainer.fit(model, train_dataloaders=loader_fn())
    return model, trainer


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), f"state keys differ: {set(a) ^ set(b)}"
    worst = 0.0
    for k in a:
        if a[k].is_floating_point():
            worst = max(worst, float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)))
        else:
            assert torch.equal(a[k], b[k]), k
    return worst


def read_wandb_history(wandb_dir) -> list[dict]:
    """The logged rows (``run.log``) of every offline W&B run under ``wandb_dir``: the run files are LevelDB-style logs
    (32 KiB blocks, 7-byte record headers) of ``Record`` protobufs after a 7-byte W&B header."""
    import glob
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(glob.glob(f"{wandb_dir}/offline-run-*/run-*.wandb")):
        raw = open(path, "rb").read()
        assert raw[:4] == b":W&B", f"{path} is not a W&B run file"
        pos, parts = 7, []
        while pos + 7 <= len(raw):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
            if length == 0 and kind == 0:
                pos += left
                continue
            parts.append(raw[pos + 7:pos + 7 + length])
            pos += 7 + length
            if kind in (1, 4):  # a full record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(b"".join(parts))
                parts = []
                if record.WhichOneof("record_type") == "history":
                    rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                 for item in record.history.item})
    return rows
