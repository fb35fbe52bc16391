"""The order of an epoch: a seeded buffered shuffle of sample ids, cut into batches, dealt round-robin to trainers.

Pure functions of (dataset size, seed, epoch, config), so every process that asks gets the same answer and the server
can hand out any trainer's batch ``j`` without keeping the others.
"""

from __future__ import annotations

import numpy as np

__all__ = ["buffered_shuffle", "epoch_batches", "trainer_share", "share_length"]


def buffered_shuffle(n: int, buffer_size: int, seed: int) -> np.ndarray:
    """A permutation of ``range(n)`` made the way a streaming loader shuffles: read ids in order into a buffer of
    ``buffer_size`` and emit a random one each time the buffer is full (then drain it at random).

    A sample is emitted at most ``buffer_size - 1`` places earlier than its stored position, so reads stay local.
    ``buffer_size >= n`` is a full shuffle; ``buffer_size <= 1`` keeps the stored order.
    """
    if n < 0:
        raise ValueError(f"buffered_shuffle: n must be >= 0, got {n}")
    if buffer_size <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    if buffer_size >= n:
        return rng.permutation(n).astype(np.int64)
    out = np.empty(n, dtype=np.int64)
    buffer = list(range(buffer_size))
    picks = rng.integers(0, buffer_size, size=n - buffer_size)
    for k, nxt in enumerate(range(buffer_size, n)):
        slot = int(picks[k])
        out[k] = buffer[slot]
        buffer[slot] = nxt
    tail = np.asarray(buffer, dtype=np.int64)
    out[n - buffer_size:] = tail[rng.permutation(buffer_size)]
    return out


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def epoch_batches(n: int, batch_size: int, *, seed: int, epoch: int, shuffle_buffer: int,
                  drop_last: bool = False) -> list[np.ndarray]:
    """The sample ids of every batch of ``epoch``, in order. Deterministic in (n, seed, epoch, config)."""
    if batch_size < 1:
        raise ValueError(f"epoch_batches: batch_size must be >= 1, got {batch_size}")
    order = buffered_shuffle(n, shuffle_buffer, _epoch_seed(seed, epoch))
    stop = (n // batch_size) * batch_size if drop_last else n
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


def trainer_share(num_batches: int, num_trainers: int, trainer_id: int) -> list[int]:
    """Indices of the epoch's batches that ``trainer_id`` trains on: every ``num_trainers``-th, starting at its id."""
    if not 0 <= trainer_id < num_trainers:
        raise ValueError(f"trainer_share: trainer_id {trainer_id} is not in [0, {num_trainers})")
    return list(range(trainer_id, num_batches, num_trainers))


def share_length(num_batches: int, num_trainers: int, trainer_id: int) -> int:
    """``len(trainer_share(...))`` without building the list."""
    return max(0, (num_batches - trainer_id + num_trainers - 1) // num_trainers)
