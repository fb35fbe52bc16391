"""The trainer's end of an expert's session stream: one long-lived hivemind P2P stream per expert that carries the
trainer's calls one after another (see ``ExpertServicer.rpc_session``), instead of a new stream per call.

Each request's header names its ``op`` and a ``call`` number; the expert runs calls in the order they came and tags
each answer with its number, so several calls can be in flight (micro-batches, a step sent without waiting for its
answer, a snapshot pull) and each caller gets its own answer. Answers that came through shared memory are
acknowledged in the next request (``acks``), and the expert frees their slots then.

Everything here runs on the trainer's ``AsyncRunner`` loop. The trainer closes the stream (the answering side never
does: see ``messages.linger``). When the stream breaks (the expert died, a cut link, an answer that cannot be read),
every call in flight gets "no answer" (``None``) and the session is done; the handle opens a new one for the next
call.

The stream is read and written here with hivemind's framing (``P2P.send_protobuf``/``receive_protobuf``) rather than
through the servicer stub: the stub's answer iterator, once the other side has gone, waits for the request iterator
to end before it ends itself, and a session's requests end only when the trainer closes it, so a dead expert's calls
would wait out ``request_timeout`` instead of failing over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import Any, AsyncIterator, Optional

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer

from lightning_distqat.swarm.messages import collect, unpack
from lightning_distqat.swarm.sharedwire import SlotReader

__all__ = ["Session", "SessionBroken"]

log = logging.getLogger(__name__)

Answer = tuple[Optional[dict[str, Any]], list[Any]]


class SessionBroken(ConnectionError):
    """The session stream ended or could not be read: its calls in flight got no answer."""


class Session:
    """One expert's session stream, opened by :meth:`open` on the runner's loop."""

    def __init__(self, p2p: P2P, peer: PeerID, handle: str, reader: Optional[SlotReader]) -> None:
        """``handle``: the name under which the expert serves ``rpc_session``; ``reader``: maps the expert's answer
        slots (None: the expert answers with bytes)."""
        self._p2p, self._peer, self._handle = p2p, peer, handle
        self._reader = reader
        self._outgoing: Optional[asyncio.Queue] = None
        self._replies: Optional[AsyncIterator[runtime_pb2.ExpertResponse]] = None
        self._task: Optional[asyncio.Task] = None
        self._writer_task: Optional[asyncio.Task] = None
        self._pending: dict[int, asyncio.Future] = {}
        self._acks: list[int] = []
        self._numbers = itertools.count()
        self.broken: Optional[BaseException] = None
        """Why the session ended (None while it is open)."""

    async def open(self) -> None:
        """Open the stream (raises what hivemind raises when the expert cannot be reached)."""
        self._outgoing = asyncio.Queue()
        _, reader, writer = await self._p2p.call_binary_stream_handler(self._peer, self._handle)
        self._writer_task = asyncio.create_task(self._write(writer, self._outgoing))
        self._replies = self._answers(reader)
        self._task = asyncio.create_task(self._read())

    async def _write(self, writer: asyncio.StreamWriter, outgoing: asyncio.Queue) -> None:
        """Send the queued calls' messages in order; at the session's end (``None``) say so and close our side."""
        try:
            while (messages := await outgoing.get()) is not None:
                for message in messages:
                    await P2P.send_protobuf(message, writer)
            await P2P.send_protobuf(P2P.END_OF_STREAM, writer)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the stream broke under us: the reader sees it too
            self._fail(SessionBroken(f"the session stream could not be written ({type(e).__name__}: {e})"))
        finally:
            writer.close()

    @staticmethod
    async def _answers(reader: asyncio.StreamReader) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """The expert's answer messages until the stream ends (the expert or its link is gone)."""
        while True:
            try:
                answer, error = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader)
            except asyncio.IncompleteReadError:
                return
            if error is not None:
                raise SessionBroken(f"the expert's session failed: {error.message}")
            yield answer

    def send(self, messages: list[runtime_pb2.ExpertRequest]) -> "asyncio.Future[Answer]":
        """Send one call (``messages`` from ``messages.pack``, its header without ``call``); returns the future of
        its answer ``(header, tensors)``, ``(None, [])`` when the session broke first."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        if self.broken is not None or self._outgoing is None:
            future.set_result((None, []))
            return future
        number = next(self._numbers)
        header = MSGPackSerializer.loads(messages[0].metadata)
        acks, self._acks = self._acks, []
        first = runtime_pb2.ExpertRequest(metadata=MSGPackSerializer.dumps({**header, "call": number, "acks": acks}),
                                          tensors=messages[0].tensors)
        self._pending[number] = future
        self._outgoing.put_nowait([first, *messages[1:]])
        return future

    async def _read(self) -> None:
        assert self._replies is not None
        cause: BaseException = SessionBroken("the session stream ended")
        try:
            while True:
                messages = await collect(self._replies, keep_open=True)
                if not messages:
                    break
                header, tensors = unpack(messages, self._reader)
                if header is None:
                    break
                number = header.pop("call", None)
                if number == -1:  # the expert refused the session or could not read a request of it
                    cause = SessionBroken(str(header.get("error", "the expert ended the session")))
                    break
                if not isinstance(number, int):
                    cause = SessionBroken(f"an answer without its call number ({number!r:.40})")
                    break
                self._acks.append(number)
                ends = header.pop("session_ends", False)
                if ends:  # a refused call: the expert reads nothing more of this session
                    cause = SessionBroken(str(header.get("error", "the expert ended the session")))
                    self.broken = cause  # before the caller sees the answer: its next call opens a new session
                future = self._pending.pop(number, None)
                if future is not None and not future.done():
                    future.set_result((header, tensors))
                if ends:
                    break
        except asyncio.CancelledError:
            cause = SessionBroken("the session was closed")
            raise
        except Exception as e:  # noqa: BLE001 - the expert died, the link broke, an answer (or its slot) is unreadable
            cause = e
        finally:
            self._fail(cause)

    def _fail(self, cause: BaseException) -> None:
        if self.broken is None:
            self.broken = cause
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_result((None, []))
        if self._outgoing is not None:
            self._outgoing.put_nowait(None)

    async def close(self) -> None:
        """End the session from the trainer's side (calls still in flight get no answer)."""
        task, replies, writing = self._task, self._replies, self._writer_task
        self._task = self._replies = self._writer_task = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._fail(SessionBroken("the session was closed"))
        if writing is not None:  # it says goodbye and closes the stream, or is cut short
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(writing, timeout=5)
        if replies is not None:
            aclose = getattr(replies, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
