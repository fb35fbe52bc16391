"""The shared-memory data server (``distqat-data``): loads a dataset once per machine and hands ready batches to the
trainers of that machine.

Trainers of the same user talk to it over a Unix socket in the user's private directory (length-prefixed JSON
messages, :mod:`lightning_distqat.data.wire`); batches travel through shared memory (see
:mod:`lightning_distqat.data.shm`). Per trainer connection one producer thread prepares the next ``prefetch``
batches of that trainer's share while the trainer trains.

Exactly once per epoch: the epoch's order is a function of (seed, epoch) and batch ``j`` belongs to trainer
``j % num_trainers``. A trainer acknowledges a batch after its training step; the server counts, per trainer and
epoch, the batches acknowledged in order (only the connection that streams a trainer's training batches acknowledges
them). A trainer that reconnects (after a crash) starts at its first unacknowledged
batch, so the batch it was training on when it died comes again and nothing it finished comes twice.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from collections import OrderedDict
from dataclasses import asdict
from typing import Any, Optional

import numpy as np

from lightning_distqat.config import DataConfig
from lightning_distqat.data.errors import DataServerError, DataSourceError
from lightning_distqat.data.order import epoch_batches, trainer_share
from lightning_distqat.data.loader import Opened, cache_in_child, open_splits
from lightning_distqat.data.shm import SharedTensors, Slot
from lightning_distqat.data.tasks import task_class
from lightning_distqat.data.wire import WireError, peer_uid, private_dir, recv, send

__all__ = ["DataServer", "default_address", "compatibility_key"]

log = logging.getLogger(__name__)

_RECONNECT_GRACE = 2.0
"""Seconds a reconnecting trainer waits for its old session to end (it ends as soon as it reads the close)."""


def default_address(cfg: DataConfig, suffix: str = "") -> str:
    """Where a server of this config listens: ``cfg.address``, or ``data-<name><suffix>.sock`` in the user's private
    socket directory (``wire.private_dir``)."""
    return cfg.address or os.path.join(private_dir(), f"data-{cfg.name}{suffix}.sock")


def compatibility_key(cfg: DataConfig) -> dict[str, Any]:
    """The fields a trainer and a server must agree on (a trainer must not silently train on another dataset)."""
    fields = ("source", "subset", "split", "val_split", "val_fraction", "task", "batch_size", "seed", "drop_last",
              "shuffle_buffer")
    return {k: v for k, v in asdict(cfg).items() if k in fields}


class DataServer:
    """Serve ``cfg``'s dataset to the trainers of this machine.

    ``start()`` loads the data, checks it against the task and listens; ``shutdown()`` stops every stream, unlinks
    every shared-memory segment and removes the socket. Construction has no side effects.
    """

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.address = default_address(cfg)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._acked: dict[tuple[int, int], int] = {}
        self._epochs: OrderedDict[tuple[str, int], list[np.ndarray]] = OrderedDict()
        self._active: dict[tuple[int, str], "_Session"] = {}
        self._sessions: set[_Session] = set()
        self._sock: Optional[socket.socket] = None
        self._accept_thread: Optional[threading.Thread] = None
        self.rows: dict[str, int] = {}
        """Rows per split (``train``, and ``validation`` when there is one)."""
        self.opened: Optional[Opened] = None
        """The loaded splits and their transform, when batches are transformed as they are served."""
        self.caches: dict[str, SharedTensors] = {}
        """Splits transformed once into shared memory (the trainers gather their rows from these)."""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "DataServer":
        """Load and check the dataset, then listen on :attr:`address`. Raises :class:`DataSourceError` for bad input
        and :class:`DataServerError` when another server already listens there.

        Splits whose rows have a fixed shape are loaded and transformed once into shared memory by a short-lived
        loader process (``data/loader.py``), so this process never imports datasets or PIL for them."""
        cfg = self.cfg
        for field, value, low in (("batch_size", cfg.batch_size, 1), ("num_trainers", cfg.num_trainers, 1),
                                  ("prefetch", cfg.prefetch, 1), ("shuffle_buffer", cfg.shuffle_buffer, 0)):
            if value < low:
                raise DataSourceError(f"DataConfig.{field} must be >= {low}, got {value}")
        self._check_address_free()
        try:
            cached = cache_in_child(cfg) if cfg.cache and task_class(cfg.task).fixed_shape else None
            if cached is None:
                self.opened = open_splits(cfg)
                self.rows = self.opened.rows
            else:
                self.rows, self.caches = cached
            self._listen()
        except BaseException:
            self._close_caches()
            raise
        train = self.rows["train"]
        if train // cfg.batch_size < cfg.num_trainers and cfg.drop_last:
            log.warning("DataServer: %d full batches for %d trainers: some trainers get none", train // cfg.batch_size,
                        cfg.num_trainers)
        sizes = ", ".join(f"{rows} {name}" for name, rows in self.rows.items())
        cached_text = "transformed once into shared memory" if self.caches else "transformed as served"
        log.info("DataServer: serving '%s' (%s rows, %s; task %s; batch %d; %d trainer(s); seed %d) at %s",
                 cfg.source, sizes, cached_text, cfg.task, cfg.batch_size, cfg.num_trainers, cfg.seed, self.address)
        return self

    def _close_caches(self) -> None:
        for cache in self.caches.values():
            cache.close()
        self.caches.clear()

    def _check_address_free(self) -> None:
        if os.path.exists(self.address):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.address)
            except OSError:  # nobody listens: a stale socket of a killed server
                os.unlink(self.address)
            else:
                raise DataServerError(f"a data server already listens at {self.address}; connect to it, or give "
                                      f"this one another DataConfig.name or address")
            finally:
                probe.close()

    def _listen(self) -> None:
        self._check_address_free()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        os.fchmod(sock.fileno(), 0o600)  # the socket file is created with this mode: only this user may connect
        sock.bind(self.address)
        sock.listen(64)
        self._sock = sock
        self._accept_thread = threading.Thread(target=self._accept_loop, name="distqat-data-accept", daemon=True)
        self._accept_thread.start()

    def shutdown(self) -> None:
        """Stop accepting, end every trainer's stream, unlink all segments and the socket. Idempotent."""
        self._stop.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept thread
            except OSError:
                pass
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
            self._accept_thread = None
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:  # each wakes up as its connection shuts down, and cleans up after itself
            session.close()
            session.join(timeout=15)
        self._close_caches()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                os.unlink(self.address)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "DataServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                sock, _ = self._sock.accept()
            except OSError:  # shut down (or a connection that failed on its way in)
                continue
            try:
                uid = peer_uid(sock)
            except OSError:
                uid = -1
            if uid != os.getuid():  # only this user's processes (the socket's directory keeps others out too)
                log.warning("DataServer: refused a connection from user %d", uid)
                sock.close()
                continue
            session = _Session(self, sock)
            with self._lock:
                if self._stop.is_set():
                    sock.close()
                    return
                self._sessions.add(session)
            session.start()

    # ------------------------------------------------------------------ what sessions ask
    def info(self) -> dict[str, Any]:
        """What a trainer needs to know: the compatibility key, trainers, rows and batches per split, pid."""
        return {
            "config": compatibility_key(self.cfg),
            "num_trainers": self.cfg.num_trainers,
            "rows": dict(self.rows),
            "batches": {name: len(self.batches(name, 0)) for name in self.rows},
            "pid": os.getpid(),
        }

    def batches(self, split: str, epoch: int) -> list[np.ndarray]:
        """Sample ids of every batch of ``split`` in ``epoch`` (train: shuffled; validation: stored order)."""
        key = (split, epoch if split == "train" else 0)
        with self._lock:
            if key not in self._epochs:
                n, cfg = self.rows[split], self.cfg
                if split == "train":
                    batches = epoch_batches(n, cfg.batch_size, seed=cfg.seed, epoch=epoch,
                                            shuffle_buffer=cfg.shuffle_buffer, drop_last=cfg.drop_last)
                else:
                    batches = epoch_batches(n, cfg.batch_size, seed=0, epoch=0, shuffle_buffer=0)
                self._epochs[key] = batches
                while len(self._epochs) > 4:
                    self._epochs.popitem(last=False)
            return self._epochs[key]

    def plan(self, session: "_Session", trainer_id: int, split: str, epoch: int) -> tuple[list[int], int]:
        """Batch indices this trainer gets in ``epoch`` and how many of them it has already acknowledged; makes
        ``session`` the trainer's only stream of ``split``."""
        if split not in self.rows:
            raise DataServerError(f"data server for '{self.cfg.source}' has no '{split}' split; it serves "
                                  f"{', '.join(self.rows)} (set DataConfig.val_split or val_fraction)")
        if not 0 <= trainer_id < self.cfg.num_trainers:
            raise DataServerError(f"trainer_id {trainer_id} is out of range for this data server "
                                  f"(num_trainers={self.cfg.num_trainers}); start it with num_trainers >= "
                                  f"{trainer_id + 1}")
        if epoch < 0:
            raise DataServerError(f"epoch must be >= 0, got {epoch}")
        num = len(self.batches(split, epoch))
        with self._lock:
            holder = self._active.get((trainer_id, split))
        if holder is not None and holder is not session and holder.alive:
            # a trainer that closed its connection and reconnected at once may arrive before the old session has
            # read the end of its connection: give that session a few polls to notice before calling it a clash
            holder.join(timeout=_RECONNECT_GRACE)
        with self._lock:
            holder = self._active.get((trainer_id, split))
            if holder is not None and holder is not session and holder.alive:
                raise DataServerError(f"trainer_id {trainer_id} is already connected to the data server for "
                                      f"'{split}'; every trainer needs its own id")
            self._active[(trainer_id, split)] = session
            if split != "train":
                return list(range(num)), 0
            return trainer_share(num, self.cfg.num_trainers, trainer_id), self._acked.get((trainer_id, epoch), 0)

    def ack(self, trainer_id: int, epoch: int, index: int) -> None:
        """Record that ``trainer_id`` finished training on batch ``index`` of ``epoch``."""
        total, step = len(self.batches("train", epoch)), self.cfg.num_trainers
        with self._lock:
            done = self._acked.get((trainer_id, epoch), 0)
            expected = trainer_id + done * step  # the trainer's share is trainer_id, trainer_id + step, ...
            if index == expected and index < total:
                self._acked[(trainer_id, epoch)] = done + 1
            elif not (index < expected and (index - trainer_id) % step == 0):  # not a repeat of a finished one
                log.warning("DataServer: trainer %d acknowledged batch %d of epoch %d out of order (expected %s)",
                            trainer_id, index, epoch, expected if expected < total else "none")

    def streams_train(self, session: "_Session", trainer_id: int) -> bool:
        """Whether ``session`` is the one connection that streams ``trainer_id``'s training batches."""
        with self._lock:
            return self._active.get((trainer_id, "train")) is session

    def release(self, session: "_Session") -> None:
        """Forget an ended session (its acknowledgements are kept)."""
        with self._lock:
            self._sessions.discard(session)
            for key in [k for k, s in self._active.items() if s is session]:
                del self._active[key]


class _Session(threading.Thread):
    """One trainer connection: answers its requests and runs the producer of its current stream."""

    def __init__(self, server: DataServer, sock: socket.socket) -> None:
        super().__init__(name="distqat-data-session", daemon=True)
        self.server, self.sock = server, sock
        self.alive = True
        self.trainer_id: Optional[int] = None
        """The trainer this connection serves (set by its first ``start``); its ``ack``s count for it alone."""
        self._stream: Optional[_Stream] = None

    def close(self) -> None:
        """End the session from another thread: its blocked ``recv`` returns at once."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def run(self) -> None:
        try:
            while not self.server._stop.is_set():
                reply = self._handle(recv(self.sock))
                if reply is not None:
                    send(self.sock, reply)
        except (EOFError, OSError):
            pass  # the trainer went away (normal exit or crash), or the server stops; what was acknowledged is kept
        except (WireError, TypeError, ValueError) as e:  # a malformed message: this connection ends, nothing else
            log.warning("DataServer: closed a connection that sent a malformed message (%s)", e)
        finally:
            self.alive = False
            if self._stream is not None:
                self._stream.stop()
            self.server.release(self)
            try:
                self.sock.close()
            except OSError:
                pass

    def _handle(self, message: list) -> Optional[tuple]:
        kind = message[0]
        try:
            if kind == "info" and len(message) == 1:
                return ("info", self.server.info())
            if kind == "start":
                _, trainer_id, split, epoch = _typed(message, int, str, int)
                if self.trainer_id not in (None, trainer_id):
                    raise DataServerError(f"this connection serves trainer {self.trainer_id}; connect again as "
                                          f"trainer {trainer_id}")
                share, done = self.server.plan(self, trainer_id, split, epoch)
                self.trainer_id = trainer_id
                if self._stream is not None:
                    self._stream.stop()
                self._stream = _Stream(self.server, split, epoch, share[done:])
                cache = self.server.caches.get(split)
                return ("started", len(share), done, (cache.name, cache.layout) if cache is not None else None)
            if kind == "next" and len(message) == 1:
                if self._stream is None:
                    return ("error", "DataServerError", "'next' before 'start'")
                return self._stream.next()
            if kind == "ack":
                _, trainer_id, epoch, index = _typed(message, int, int, int)
                if trainer_id == self.trainer_id and self.server.streams_train(self, trainer_id):
                    self.server.ack(trainer_id, epoch, index)
                else:  # only the connection that streams a trainer's training batches acknowledges them
                    log.warning("DataServer: a connection of trainer %s (not streaming its training batches) "
                                "acknowledged for trainer %s; ignored", self.trainer_id, trainer_id)
                return None
            return ("error", "DataServerError", f"unknown request {kind!r}")
        except (DataServerError, DataSourceError) as e:
            return ("error", type(e).__name__, str(e))


def _typed(message: list, *types: type) -> list:
    """``message`` if its fields after the kind have ``types`` (bools are not ints); ``TypeError`` otherwise."""
    if len(message) != len(types) + 1 or not all(type(v) is t for v, t in zip(message[1:], types)):
        raise TypeError(f"malformed {message[0]!r} message: {message!r}")
    return message


class _Stream:
    """The batches of one trainer in one epoch of one split. From a cached split the trainer gathers rows itself;
    otherwise they are prepared ahead into ``prefetch`` + 1 reusable slots by a producer thread."""

    def __init__(self, server: DataServer, split: str, epoch: int, indices: list[int]) -> None:
        self.server, self.split, self.epoch = server, split, epoch
        self.indices = indices
        self._stop = threading.Event()
        self._cached = split in server.caches
        self._position = 0
        self._thread: Optional[threading.Thread] = None
        self._slots: list[Slot] = []
        if self._cached:
            return
        self._slots = [Slot() for _ in range(server.cfg.prefetch + 1)]
        self._free: queue.Queue[Optional[Slot]] = queue.Queue()
        for slot in self._slots:
            self._free.put(slot)
        self._ready: queue.Queue[tuple] = queue.Queue()
        self._handed: Optional[Slot] = None
        self._thread = threading.Thread(target=self._produce, name="distqat-data-producer", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        opened = self.server.opened
        assert opened is not None, "an uncached split needs the opened dataset"
        batches = self.server.batches(self.split, self.epoch)
        try:
            for index in self.indices:
                slot = self._take_free()
                if slot is None:
                    return
                layout = slot.write(opened.prepare(self.split, batches[index]))
                self._ready.put(("batch", index, slot, layout))
            self._ready.put(("end",))
        except Exception as e:  # one bad batch fails this trainer's request, never the server
            log.exception("DataServer: preparing a %s batch failed", self.split)
            self._ready.put(("error", type(e).__name__, f"the data server failed to prepare a batch: {e}"))

    def _take_free(self) -> Optional[Slot]:
        """A free slot, or None once the stream stops (``stop`` puts None in the queue)."""
        slot = None if self._stop.is_set() else self._free.get()
        return None if self._stop.is_set() else slot

    def next(self) -> tuple:
        if self._cached:
            if self._position >= len(self.indices):
                return ("end",)
            index = self.indices[self._position]
            self._position += 1
            return ("rows", index, self.server.batches(self.split, self.epoch)[index].tolist())
        if self._handed is not None:  # the trainer copied it out before asking again
            self._free.put(self._handed)
            self._handed = None
        item = self._ready.get()
        if item[0] != "batch":
            self._ready.put(item)  # "end" and errors answer every later request too
            return item
        _, index, slot, layout = item
        self._handed = slot
        return ("batch", index, slot.name, layout)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._free.put(None)  # wakes the producer
            self._ready.put(("error", "DataServerError", "the data server is shutting down"))
            self._thread.join(timeout=10)
        for slot in self._slots:
            slot.close()

