"""Micro-batches in flight: run the user's step on several micro-batches at once, so that while one waits for an
expert the others' calls go out and every expert of the pipeline has work.

Each micro-batch runs on a thread of its own, but only one of them runs Python at a time: they pass a baton (a lock)
and give it up only while they wait for an expert's answer (:func:`waiting`, called by ``ExpertHandle``). So the
user's ``training_step`` and Lightning's logging never run concurrently with themselves, and the overlap is exactly
the time spent waiting on the network and on the experts.

:func:`split_batch` cuts a batch (tensors, and tuples, lists and str-keyed dicts of them) along its first dimension;
:class:`JoinMicroLosses` turns the micro-batches' losses into one loss whose backward runs the micro-batches'
backward passes concurrently, each scaled by its share of the batch, so that the gradients equal the whole batch's
(up to float rounding) for a loss that is a mean over samples.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

__all__ = ["waiting", "MicroBatches", "split_batch", "batch_rows", "first_rows", "JoinMicroLosses"]

_local = threading.local()


@contextmanager
def waiting() -> Iterator[None]:
    """Around a wait for an expert: a micro-batch's thread lets the others run meanwhile."""
    baton: Optional[threading.Lock] = getattr(_local, "baton", None)
    if baton is None:
        yield
        return
    baton.release()
    try:
        yield
    finally:
        baton.acquire()


def _rows(value: Any) -> Optional[int]:
    if isinstance(value, torch.Tensor):
        return value.shape[0] if value.dim() else None
    if isinstance(value, dict):
        items: Sequence[Any] = list(value.values())
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        return None
    for item in items:
        rows = _rows(item)
        if rows is not None:
            return rows
    return None


def _cut(value: Any, rows: int, bounds: list[tuple[int, int]]) -> list[Any]:
    if isinstance(value, torch.Tensor):
        if value.dim() and value.shape[0] == rows:
            return [value[a:b] for a, b in bounds]
        return [value] * len(bounds)
    if isinstance(value, dict):
        cuts = {k: _cut(v, rows, bounds) for k, v in value.items()}
        return [type(value)({k: c[i] for k, c in cuts.items()}) for i in range(len(bounds))]  # type: ignore[call-arg]
    if isinstance(value, (list, tuple)):
        cuts = [_cut(v, rows, bounds) for v in value]
        parts = [[c[i] for c in cuts] for i in range(len(bounds))]
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
            return [type(value)(*p) for p in parts]
        return [type(value)(p) for p in parts]
    return [value] * len(bounds)


def batch_rows(batch: Any) -> Optional[int]:
    """The batch dimension: the first dimension of the batch's first tensor (None without one)."""
    return _rows(batch)


def first_rows(batch: Any, n: int) -> Any:
    """The first ``n`` rows of every tensor of ``batch`` along its batch dimension (other values as they are)."""
    rows = _rows(batch)
    if rows is None or n >= rows:
        return batch
    return _cut(batch, rows, [(0, n)])[0]


def split_batch(batch: Any, m: int) -> Optional[list[tuple[Any, int]]]:
    """``batch`` cut into at most ``m`` micro-batches along the first dimension of its tensors (those whose first
    dimension is the batch's: the first tensor's), with their sizes; other values go to every micro-batch. None
    when the batch holds no tensor with a first dimension."""
    rows = _rows(batch)
    if rows is None or rows == 0:
        return None
    m = min(m, rows)
    edges = [round(i * rows / m) for i in range(m + 1)]
    bounds = [(edges[i], edges[i + 1]) for i in range(m)]
    return list(zip(_cut(batch, rows, bounds), [b - a for a, b in bounds]))


class MicroBatches:
    """Runs a function on several micro-batches at once, handing the baton from one to the next (see module doc)."""

    def __init__(self, workers: int) -> None:
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="distqat-micro")
        self._baton = threading.Lock()

    def run(self, fn: Callable[[Any], Any], parts: Sequence[Any]) -> list[Any]:
        """``[fn(part) for part in parts]``, overlapped; the first exception is raised once every part ended."""

        def one(part: Any) -> Any:
            self._baton.acquire()
            _local.baton = self._baton
            try:
                return fn(part)
            finally:
                _local.baton = None
                self._baton.release()

        futures = [self._pool.submit(one, part) for part in parts]
        results, error = [], None
        for future in futures:
            try:
                results.append(future.result())
            except BaseException as e:  # noqa: BLE001 - raised below, after every part ended
                error = error or e
        if error is not None:
            raise error
        return results

    def backward(self, losses: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        """``torch.autograd.backward(loss, grad)`` for every pair at once (their graphs are disjoint but for leaves,
        whose gradients autograd accumulates under its own lock)."""
        self.run(lambda pair: torch.autograd.backward(pair[0], pair[1]), list(zip(losses, grads)))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class JoinMicroLosses(torch.autograd.Function):
    """``sum(w_i * loss_i)`` as one loss; its backward runs every micro-batch's backward concurrently with its
    output gradient scaled by ``w_i``. The losses travel in a list, out of autograd's sight, so that its engine does
    not walk their graphs itself: ``JoinMicroLosses.apply(dummy, runner, weights, losses)`` with a ``dummy`` that
    requires grad."""

    @staticmethod
    def forward(ctx, dummy, runner, weights, losses):  # noqa: ANN001, ANN205
        ctx.runner, ctx.weights, ctx.losses = runner, weights, list(losses)
        return sum(w * loss.detach() for w, loss in zip(weights, losses)).to(dummy.device)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        losses, ctx.losses = ctx.losses, None
        if losses is None:
            raise RuntimeError("DistqatStrategy: the micro-batches' losses were backpropagated already")
        ctx.runner.backward(losses, [grad * w for w in ctx.weights])
        return None, None, None, None
