"""The expert's RPCs over hivemind P2P. Every handler answers; a failing request gets an error reply naming the
stage, and the expert goes on serving the next request.

Who may do what: the caller is the libp2p identity of the stream (authenticated by libp2p), never a name in the
request. Every call that changes or reveals the stage's state needs the caller to hold the expert's lease; only the
holder renews or releases it. Every request is bounded (messages, bytes, concurrent calls per peer) before it is
read whole, and decoded off the event loop. With an access token, every request must prove the caller holds it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer

from lightning_distqat.config import ExpertConfig
from lightning_distqat.diloco.config import DiLoCoConfig
from lightning_distqat.diloco.pace import parse_pace
from lightning_distqat.diloco.sync import DiLoCoSync
from lightning_distqat.expert.backend import StageBackend, StageError
from lightning_distqat.quant.codecs import check_codec, decode_all, encode_all
from lightning_distqat.swarm.auth import ACCESS_DENIED, AccessToken
from lightning_distqat.swarm.messages import (
    LINGER_SECONDS, LayoutError, Malformed, TooLarge, collect, linger, pack, parts_to_state, small, state_to_parts,
    state_to_tensor, tensor_to_state, unpack,
)
from lightning_distqat.swarm.sharedwire import Arena, SlotReader, host_key

__all__ = ["ExpertServicer"]

log = logging.getLogger(__name__)
Request, Response = runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse
Body = Callable[[dict, list, str], Awaitable[tuple[dict, list]]]
class Leaving(StageError):
    """The expert is leaving (SIGTERM) and takes no new work."""


INLINE_BYTES = 2**20
"""Requests and answers with less tensor data than this are copied on the event loop (a hop to a thread and back
costs more); larger ones off it."""
_WRITTEN = object()
"""Key of an answer whose body wrote its tensors into a slot itself: (arena, slot), for the caller to free."""
REFUSED_LINGER_SECONDS = 5.0
"""How long a refused caller's stream stays open for it to read the refusal (it does not count as in flight)."""
Receive = Callable[[Callable[[dict], None]], Awaitable[list]]
MakeSync = Callable[[DiLoCoConfig, bool, Optional[str]], DiLoCoSync]


class ExpertServicer(ServicerBase):
    """RPC handlers of one expert. Stage computations run one at a time on a single worker thread.

    ``on_fatal(exc)`` is called when a request raised ``SystemExit`` or ``KeyboardInterrupt`` inside the stage (the
    server then stops instead of serving on half broken)."""

    def __init__(
        self, backend: StageBackend, peer_id: str = "", *, config: Optional[ExpertConfig] = None,
        make_sync: Optional[MakeSync] = None, on_fatal: Optional[Callable[[BaseException], None]] = None,
    ) -> None:
        self.backend = backend
        self.peer_id = peer_id
        self.config = config or ExpertConfig()
        self.access = AccessToken(self.config.access_token, self.config.experiment) if self.config.access_token \
            else None
        self._make_sync = make_sync
        self._on_fatal = on_fatal
        self.diloco: Optional[DiLoCoSync] = None
        self._diloco_config: Optional[dict[str, Any]] = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="distqat-stage", initializer=_float_mode,
                                          initargs=(self.config.flush_denormal,))
        self._lease: tuple[Optional[str], float] = (None, 0.0)
        self._last_holder: Optional[str] = None
        self.leaving = False
        self._pending_outer: Optional[dict[str, Any]] = None
        """Set on SIGTERM: only ``info``, the lease holder's ``get_state`` and its release are served."""
        self._in_flight: dict[str, int] = {}
        self.requests_served = 0
        self.requests_failed = 0
        self._backwards = 0
        self._arena: Optional[Arena] = Arena() if self.config.shared_memory else None
        """Slots for answers to callers on this host that ask for them (``reply_shm``)."""
        self._reader: Optional[SlotReader] = SlotReader() if self.config.shared_memory else None

    def serve(self, backend: StageBackend) -> Optional[DiLoCoSync]:
        """Host another stage from now on (the expert moved; call on the event loop while unleased). Returns the last
        stage's DiLoCo sync, for the caller to shut down off the loop."""
        sync, self.diloco = self.diloco, None
        self._diloco_config = self._pending_outer = self._last_holder = None
        self.backend = backend
        return sync

    def _fresh_slots(self, reopen: bool = True) -> None:
        """Unlink the answer slots and unmap the callers' slots (their owners unlink them); then new ones, unless
        the expert is stopping."""
        if self._arena is not None:
            self._arena.close()
            self._arena = Arena() if reopen else None
        if self._reader is not None:
            self._reader.close()
            self._reader = SlotReader() if reopen else None

    def shutdown(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._fresh_slots(reopen=False)
        if self.diloco is not None:
            self.diloco.shutdown()
            self.diloco = None

    @property
    def lease_holder(self) -> Optional[str]:
        """The peer id of the trainer that holds the lease (kept to this expert: records say "leased" only)."""
        holder, until = self._lease
        return holder if holder is not None and time.monotonic() < until else None

    # ------------------------------------------------------------------ plumbing
    async def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, lambda: fn(*args, **kwargs))

    async def _run_holding(self, fn: Callable[[], Any], release: Callable[[Any], None]) -> Any:
        """``fn()`` on the worker, for a result that holds an answer slot: if the caller goes away while the worker
        runs (the stream was cut), ``release(result)`` frees the slot once the worker is done with it (not before:
        the worker may still be writing into it)."""
        job = asyncio.get_running_loop().run_in_executor(self._worker, fn)
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            job.add_done_callback(lambda done: None if done.cancelled() or done.exception() is not None
                                  else release(done.result()))
            raise

    async def _into_slot(self, reply: dict, out: list, shared: bool) -> tuple[dict, list, Optional[tuple[Arena, Any]]]:
        """An answer's tensors into a shared-memory slot when its caller takes them that way (``shared``), copied
        here for little data and on the worker thread for more; returns the answer and the slot to free once the
        caller has copied it (a body may have written its slot itself: ``_WRITTEN``)."""
        taken = reply.pop(_WRITTEN, None)
        if taken is not None:
            return reply, out, taken
        arena = self._arena
        if not (shared and out and arena is not None):
            return reply, out, None
        if sum(t.numel() * t.element_size() for t in out) < INLINE_BYTES:
            written = arena.write(out)
        else:
            written = await self._run_holding(lambda: arena.write(out),
                                              lambda done: done is not None and arena.release(done[0]))
        if written is None:
            return reply, out, None
        return {**reply, "shm": written[1]}, [], (arena, written[0])

    def _slowed(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, taking ``ExpertConfig.slowdown`` times as long (the test hook; on the worker).
        The pause is in proportion to the CPU time ``fn`` used on this thread, not its wall time: on a busy machine
        the wall time grows with the other processes' load, and the hook would slow the expert down by more and more
        the busier the machine is (the drift the adaptive-sizing benchmark saw)."""
        started = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            if self.config.slowdown > 1:
                time.sleep((self.config.slowdown - 1) * (time.thread_time() - started))

    def _error(self, what: str, e: BaseException) -> dict[str, Any]:
        self.requests_failed += 1
        if isinstance(e, (StageError, TooLarge, Malformed)):
            cause = str(e)
        else:
            cause = f"{type(e).__name__}: {e}"
            log.warning("stage '%s' %s failed:\n%s", self.backend.name, what, traceback.format_exc())
        reply: dict[str, Any] = {"error": f"{cause} (stage '{self.backend.name}', expert …{self.peer_id[-8:]})"}
        if isinstance(e, Leaving):
            reply["leaving"] = True
        return reply

    def _admit(self, caller: str) -> None:
        if self._in_flight.get(caller, 0) >= self.config.max_concurrent_per_peer:
            raise StageError(f"too many concurrent requests from one peer (at most "
                             f"{self.config.max_concurrent_per_peer}); wait for the answers")
        self._in_flight[caller] = self._in_flight.get(caller, 0) + 1

    def _release(self, caller: str) -> None:
        left = self._in_flight[caller] - 1
        if left:
            self._in_flight[caller] = left
        else:
            del self._in_flight[caller]

    def _authorize(self, header: dict[str, Any], caller: str, leased: bool, what: str = "") -> None:
        if self.access is not None and not self.access.check(header.get("proof"), caller, self.peer_id):
            raise StageError(ACCESS_DENIED)
        if self.leaving and not (what in ("get_state", "info") or (what == "claim" and header.get("ttl") == 0)):
            raise Leaving("this expert is leaving (SIGTERM): it takes no new work; its lease holder may still take "
                          "its state (get_state) and release it")
        if leased and self.lease_holder != caller and not (what == "get_state" and caller in self.config.mirror_peers):
            raise StageError("this call needs the expert's lease, which the caller does not hold (claim a free "
                             "expert first)")

    async def _answer(self, what: str, context: P2PContext, receive: Receive, body: Body, *,
                      leased: Callable[[dict], bool], admitted: bool = False) -> tuple[dict, list, bool]:
        """Admit the caller (unless ``admitted``), read the request within bounds (its access proof and lease are
        checked on its first message, before the rest is read; tensors in a shared-memory slot are copied out),
        run ``body(header, tensors, caller)`` and turn any failure into an error reply. A ``SystemExit`` or
        ``KeyboardInterrupt`` from the stage is fatal: the expert stops (after answering with the error). Returns
        the reply, its tensors and whether the caller takes them through shared memory."""
        caller = context.remote_id.to_base58()
        if not admitted:
            try:
                self._admit(caller)
            except StageError as e:
                return self._error(what, e), [], False
        try:
            check = lambda header: self._authorize(header, caller, leased(header), what)  # noqa: E731
            messages = await receive(check)
            if small(messages, INLINE_BYTES):  # a copy of little data: cheaper here than a hop to another thread
                header, tensors = unpack(messages, self._reader, self.config.max_request_bytes)
            else:
                header, tensors = await asyncio.get_running_loop().run_in_executor(
                    None, unpack, messages, self._reader, self.config.max_request_bytes)
            if header is None:
                raise StageError("empty or incomplete request")
            check(header)
            reply, out = await body(header, tensors, caller)
            self.requests_served += 1
            return reply or {}, out, header.get("reply_shm") is True
        except (SystemExit, KeyboardInterrupt) as e:
            log.critical("stage '%s' %s raised %s; the expert stops", self.backend.name, what, type(e).__name__)
            if self._on_fatal is not None:
                self._on_fatal(e)
            return self._error(what, e), [], False
        except Exception as e:  # noqa: BLE001 - one bad request must never stop the expert
            return self._error(what, e), [], False
        finally:
            if not admitted:
                self._release(caller)

    def _streamed_request(self, requests: AsyncIterator[Request]) -> Receive:
        cfg = self.config
        return lambda check: collect(requests, max_messages=cfg.max_request_messages,
                                     max_bytes=cfg.max_request_bytes, check=check)

    @staticmethod
    def _unary_request(request: Request) -> Receive:
        async def receive(check: Callable[[dict], None]) -> list:
            return [request]

        return receive

    async def _streamed(self, what: str, context: P2PContext, receive: Receive, body: Body, *,
                        leased: Callable[[dict], bool]) -> AsyncIterator[Response]:
        """:meth:`_answer` as a streamed reply that the caller closes (see ``messages.linger``). The caller counts
        against ``max_concurrent_per_peer`` until its stream ends, lingering included."""
        caller = context.remote_id.to_base58()
        try:
            self._admit(caller)
        except StageError as e:  # refused before anything is read; a short linger, not counted
            async for message in linger(pack(Response, self._error(what, e)), seconds=REFUSED_LINGER_SECONDS):
                yield message
            return
        taken = None
        try:
            reply, out, taken = await self._into_slot(
                *await self._answer(what, context, receive, body, leased=leased, admitted=True))
            async for message in linger(pack(Response, reply, out)):
                yield message
        finally:
            self._release(caller)
            if taken is not None:  # the caller copied the answer before it closed the stream
                taken[0].release(taken[1])

    # ------------------------------------------------------------------ tensor RPCs (streamed)
    async def _forward(self, header: dict, tensors: list, caller: str) -> tuple[dict, list]:
        def run() -> tuple[dict, list]:  # one hop to the worker: decode, compute, encode
            outputs, layout = self._slowed(
                self.backend.forward, str(header["request_id"]), header["layout"],
                _decoded(header, tensors, self.config.max_request_bytes), training=bool(header["training"]),
                need_grad=bool(header["need_grad"]))
            return _encoded({"layout": layout}, header, outputs, f"stage '{self.backend.name}' output")

        return await self._run(run)

    async def _backward(self, header: dict, grad_outputs: list, caller: str) -> tuple[dict, list]:
        """Backpropagate; with ``norm`` (a norm type) in the request, the answer carries the norm of the stage's
        accumulated gradients after this backward (clipping then needs no ``grad_norm`` call)."""
        norm_type = header.get("norm")
        if norm_type is not None and (not isinstance(norm_type, (int, float)) or isinstance(norm_type, bool)):
            raise StageError(f"a backward's norm is a norm type (a number), got {norm_type!r:.40}")

        def run() -> tuple[dict, list]:  # one hop to the worker: decode, compute, encode
            grads = self._slowed(self.backend.backward, str(header["request_id"]),
                                 _decoded(header, grad_outputs, self.config.max_request_bytes))
            self._backwards += 1
            reply: dict[str, Any] = {"present": [g is not None for g in grads]}
            if norm_type is not None:  # with the number of backwards so far: the caller keeps the newest norm
                reply["norm"], reply["n"] = self.backend.grad_norm(float(norm_type)), self._backwards
            return _encoded(reply, header, [g for g in grads if g is not None],
                            f"stage '{self.backend.name}' input gradient")

        return await self._run(run)

    async def rpc_forward(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        """Run the stage. Without the lease only an inference call (no training mode, no gradients) is served."""
        async for message in self._streamed("forward", context, self._streamed_request(requests), self._forward,
                                            leased=_changes_state):
            yield message

    async def rpc_backward(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        async for message in self._streamed("backward", context, self._streamed_request(requests), self._backward,
                                            leased=_always):
            yield message

    def _get_state(self, parts: Any) -> dict[str, Any]:
        """The stage's state: ``module`` and ``optimizers`` (the backend's), and ``diloco`` (its outer state) while
        DiLoCo runs; ``parts`` (a list of those names) picks some."""
        if parts is not None and (not isinstance(parts, list) or not set(parts) <= {"module", "optimizers", "diloco"}):
            raise StageError(f"get_state parts are among module, optimizers, diloco; got {parts!r}")
        state = self.backend.get_state() if parts is None or {"module", "optimizers"} & set(parts) else {}
        if parts is not None:
            state = {k: v for k, v in state.items() if k in parts}
        if self.diloco is not None and (parts is None or "diloco" in parts):
            state["diloco"] = self.diloco.state.state_dict()
        return state

    def _set_state(self, state: Any) -> None:
        """Load (part of) what :meth:`_get_state` returns. An outer state (``diloco``) keeps the local params as the
        module part left them; before DiLoCo starts it waits for ``start``."""
        if not isinstance(state, dict):
            raise StageError(f"a state is a dict, got {type(state).__name__}")
        outer = state.get("diloco")
        if outer is not None and not (isinstance(outer, dict) and isinstance(outer.get("outer"), list)
                                      and isinstance(outer.get("round"), int) and isinstance(outer.get("optimizer"),
                                                                                              dict)):
            raise StageError("the diloco part of a state is {'outer': [tensors], 'optimizer': {...}, 'round': int}")
        self.backend.set_state({k: v for k, v in state.items() if k != "diloco"})
        if outer is None:
            return
        if self.diloco is None:
            self._pending_outer = outer
            return
        try:
            self.diloco.state.load_state_dict(outer, reset_local=False)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise StageError(f"the outer state does not fit stage '{self.backend.name}' ({e})") from None

    async def _get_state_body(self, header: dict, _: list, caller: str) -> tuple[dict, list]:
        """The state as a skeleton in the answer's header and its tensors as tensors (``messages.state_to_parts``);
        a state that does not fit that form (it should always) goes as one ``torch.save`` blob."""
        def run() -> tuple[dict, list]:  # the state's tensors are copied here, between two of the stage's calls
            state = self._get_state(header.get("parts"))
            try:
                skeleton, tensors = state_to_parts(state)
            except LayoutError:
                return {}, [state_to_tensor(state)]
            arena = self._arena
            if header.get("reply_shm") is True and arena is not None:
                written = arena.write(tensors)
                if written is not None:
                    return {"state": skeleton, "shm": written[1], _WRITTEN: (arena, written[0])}, []
            return {"state": skeleton}, [t.clone() for t in tensors]

        def release(result: tuple[dict, list]) -> None:
            held = result[0].get(_WRITTEN)
            if held is not None:
                held[0].release(held[1])

        return await self._run_holding(run, release)

    async def _set_state_body(self, header: dict, tensors: list, caller: str) -> tuple[dict, list]:
        """Either form of :meth:`_get_state_body`'s answer."""
        def run() -> None:
            if "state" in header:
                try:
                    state = parts_to_state(header["state"], tensors)
                except Malformed as e:
                    raise StageError(f"set_state: {e}") from None
            elif len(tensors) == 1:
                state = tensor_to_state(tensors[0])
            else:
                raise StageError(f"set_state expects a state skeleton or one serialized state, got {len(tensors)} "
                                 "tensors and no skeleton")
            self._set_state(state)

        await self._run(run)
        return {}, []

    async def rpc_get_state(self, request: Request, context: P2PContext) -> AsyncIterator[Response]:
        async for message in self._streamed("get_state", context, self._unary_request(request), self._get_state_body,
                                            leased=_always):
            yield message

    async def rpc_set_state(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        async for message in self._streamed("set_state", context, self._streamed_request(requests),
                                            self._set_state_body, leased=_always):
            yield message

    # ------------------------------------------------------------------ the session stream
    def _session_ops(self) -> dict[str, tuple[Body, Callable[[dict], bool]]]:
        def unary(fn: Callable[[dict, str], Any]) -> Body:
            async def body(header: dict, _: list, caller: str) -> tuple[dict, list]:
                return (await self._run(fn, header, caller)) or {}, []

            return body

        return {"forward": (self._forward, _changes_state), "backward": (self._backward, _always),
                "step": (unary(self._step), _always), "grad_norm": (unary(self._grad_norm), _always),
                "get_state": (self._get_state_body, _always), "set_state": (self._set_state_body, _always)}

    async def rpc_session(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        """One long-lived stream from a trainer that carries its calls (forward, backward, step, grad_norm,
        get_state, set_state) one after the other: each request's header names its ``op`` and a ``call`` number that
        its answer repeats. Calls run in the order they came (so a step sent right after a backward lands before the
        next forward), while the next requests are read meanwhile (at most ``max_concurrent_per_peer`` waiting).
        Every call is checked as if it came alone (access proof, lease, bounds). The session counts as one call in
        flight of its peer; the caller closes it. Answers through shared memory stay in their slots until the caller
        acknowledges them (``acks`` in a later request) or the session ends. A request that breaks the wire format
        or has no call number ends the session with an error answer for call -1."""
        caller = context.remote_id.to_base58()
        try:
            self._admit(caller)
        except StageError as e:
            async for message in linger(pack(Response, {**self._error("session", e), "call": -1}),
                                        seconds=REFUSED_LINGER_SECONDS):
                yield message
            return
        cfg = self.config
        waiting: asyncio.Queue = asyncio.Queue(max(1, cfg.max_concurrent_per_peer))
        held: dict[int, tuple[Arena, Any]] = {}
        ops = self._session_ops()

        def check(header: dict) -> None:  # on a call's first message, before the rest of it is read
            op = header.get("op")
            if isinstance(op, str) and op in ops:
                try:
                    self._authorize(header, caller, ops[op][1](header), op)
                except StageError as e:
                    call = header.get("call")
                    e.call = call if isinstance(call, int) and not isinstance(call, bool) and call >= 0 else -1
                    raise

        async def read() -> None:
            try:
                while True:
                    messages = await collect(requests, max_messages=cfg.max_request_messages,
                                             max_bytes=cfg.max_request_bytes, keep_open=True, check=check)
                    if not messages:
                        break
                    await waiting.put(messages)
            except (TooLarge, Malformed, StageError) as e:  # nothing more of this session is read
                await waiting.put(e)
            finally:
                await waiting.put(None)

        reader = asyncio.create_task(read())
        try:
            while (messages := await waiting.get()) is not None:
                if isinstance(messages, Exception):  # refused or unreadable: its error, then the session ends
                    call = getattr(messages, "call", -1)
                    # ``session_ends``: the caller marks the session broken before it hands out this answer, so
                    # its next call opens a new session instead of racing the end of this one
                    for message in pack(Response, {**self._error("session", messages), "call": call,
                                                   "session_ends": True}):
                        yield message
                    if call != -1:  # calls sent after it: nothing of them was read
                        for message in pack(Response, {"error": "the session ended after a refused call", "call": -1}):
                            yield message
                    break
                answer, end = await self._session_call(messages, context, ops, held)
                for message in answer:
                    yield message
                if end:
                    break
            await asyncio.sleep(LINGER_SECONDS)  # the caller closes the stream (see messages.linger)
        finally:
            reader.cancel()
            self._release(caller)
            for arena, slot in held.values():
                arena.release(slot)

    async def _session_call(self, messages: list, context: P2PContext,
                            ops: dict[str, tuple[Body, Callable[[dict], bool]]], held: dict[int, tuple[Arena, Any]]
                            ) -> tuple[list[Response], bool]:
        """Answer one call of a session (see :meth:`rpc_session`): its messages, ready to send, and whether the
        session ends after it."""
        try:
            header = MSGPackSerializer.loads(messages[0].metadata) if messages[0].metadata else {}
            call, op = header.get("call"), header.get("op")
        except Exception:  # noqa: BLE001 - unpack names what is wrong below
            call, op, header = None, None, {}
        if not isinstance(call, int) or isinstance(call, bool) or call < 0:
            error = StageError(f"a session call has a call number (an int >= 0), got {call!r:.40}; the session ends")
            return list(pack(Response, {**self._error("session", error), "call": -1})), True
        acks = header.get("acks")
        for ack in acks if isinstance(acks, list) else ():
            if isinstance(ack, int) and ack in held:
                arena, slot = held.pop(ack)
                arena.release(slot)
        if not isinstance(op, str) or op not in ops:
            return list(pack(Response, {**self._error("session", StageError(
                f"a session call's op is one of {sorted(ops)}, got {op!r:.40}")), "call": call})), False

        async def receive(check: Callable[[dict], None]) -> list:
            check(header)
            return messages

        body, leased = ops[op]
        reply, out, taken = await self._into_slot(
            *await self._answer(op, context, receive, body, leased=leased, admitted=True))
        if taken is not None:
            old = held.pop(call, None)  # a call number used twice: the older answer's slot goes
            if old is not None:
                old[0].release(old[1])
            held[call] = taken
            while len(held) > 4 * max(1, self.config.max_concurrent_per_peer):  # a caller that never acknowledges
                oldest = held.pop(next(iter(held)))  # cannot hold the arena: its oldest answers' slots go
                oldest[0].release(oldest[1])
        return list(pack(Response, {**reply, "call": call}, out)), False

    # ------------------------------------------------------------------ control RPCs (unary)
    async def _unary(self, what: str, request: Request, context: P2PContext, fn: Callable[..., Any], *,
                     leased: Callable[[dict], bool] = lambda h: True) -> Response:
        async def body(header: dict, _: list, caller: str) -> tuple[dict, list]:
            return (await self._run(fn, header, caller)) or {}, []

        reply, _, _ = await self._answer(what, context, self._unary_request(request), body, leased=leased)
        return next(pack(Response, reply))

    async def rpc_configure(self, request: Request, context: P2PContext) -> Response:
        def fn(header: dict, caller: str) -> None:
            qat = header.get("qat")
            if qat is not None and not isinstance(qat, dict):
                raise StageError(f"qat is None or {{'scheme', 'group_size'}}, got {qat!r}")
            if qat:
                self.backend.prepare_qat(qat["scheme"], int(qat["group_size"]))
            else:
                self.backend.prepare_qat(None, 0)
            optimizers = header.get("optimizers")
            if not isinstance(optimizers, dict):
                raise StageError("configure needs {index: optimizer spec}")
            for index, spec in optimizers.items():
                if not isinstance(spec, dict):
                    raise StageError(f"optimizer spec {index!r} is not a dict")
                self.backend.configure_optimizer(int(index), spec, caller)

        return await self._unary("configure", request, context, fn)

    def _step(self, header: dict, caller: str) -> dict[str, Any]:
        skipped = self.backend.step(int(header["index"]), header.get("groups"),
                                    clip_norm=header.get("clip_norm"), clip_value=header.get("clip_value"))
        if skipped:
            log.warning("%s", skipped)
        return {"skipped": skipped} if skipped else {}

    def _grad_norm(self, header: dict, caller: str) -> dict[str, Any]:
        return {"norm": self.backend.grad_norm(float(header["norm_type"]))}

    async def rpc_step(self, request: Request, context: P2PContext) -> Response:
        return await self._unary("step", request, context, self._step)

    async def rpc_grad_norm(self, request: Request, context: P2PContext) -> Response:
        return await self._unary("grad_norm", request, context, self._grad_norm)

    async def rpc_diloco(self, request: Request, context: P2PContext) -> Response:
        """DiLoCo control: ``{"op": "start", "config": {...}, "solo": bool}`` joins the stage's averaging group (and
        loads the current outer state from a peer); a later ``start`` must bring the same config. ``{"op": "round",
        "samples": n, "target": r}`` runs one outer round (skipped when the stage's outer state is already at round
        ``r``, see ``DiLoCoSync.round``); ``{"op": "finish"}`` resets the local params to the outer params."""

        def fn(header: dict, caller: str) -> Any:
            op = header.get("op")
            if op == "start":
                return self._start_diloco(header, caller)
            if self.diloco is None:
                raise StageError(f"DiLoCo op {op!r} before 'start'")
            if op == "round":
                samples = float(header["samples"])
                pace = header.get("pace")
                if pace is not None and parse_pace(pace) is None:
                    raise StageError(f"a round's pace is {{'sps': seconds per sample > 0, 'full': batch size >= 1}}, "
                                     f"got {pace!r:.100}")
                target = header.get("target")
                if target is not None and (type(target) is not int or not 0 <= target < 2**31):
                    raise StageError(f"a round's target is None or an int in [0, 2^31), got {target!r:.40}")
                return {**asdict(self.diloco.round(samples, pace=pace, target=target)),
                        "checksum": self.diloco.state.checksum()}
            if op == "finish":
                self.diloco.state.copy_to_local()
                return {"round": self.diloco.state.round}
            raise StageError(f"unknown DiLoCo op {op!r}")

        return await self._unary("diloco", request, context, fn)

    def _start_diloco(self, header: dict[str, Any], caller: str) -> dict[str, Any]:
        config = header.get("config")
        known = {f.name for f in fields(DiLoCoConfig)}
        if not isinstance(config, dict) or set(config) - known:
            raise StageError(f"a DiLoCo config is a dict with keys among {sorted(known)}")
        if self.diloco is not None:
            if config != self._diloco_config:
                raise StageError("this stage already averages with another DiLoCo config; every replica of an "
                                 "experiment uses the same one")
            return {"round": self.diloco.state.round}
        if self._make_sync is None:
            raise StageError("this expert cannot run DiLoCo (no DHT to average over)")
        try:
            parsed = DiLoCoConfig(**config)
        except (TypeError, ValueError) as e:
            raise StageError(f"bad DiLoCo config: {e}") from None
        try:
            sync = self._make_sync(parsed, bool(header.get("solo", False)), caller)
        except ValueError as e:  # an outer optimizer or its arguments that this expert does not allow
            raise StageError(f"bad DiLoCo config: {e}") from None
        pending, self._pending_outer = self._pending_outer, None
        if pending is not None:  # a checkpoint's or snapshot's outer state came first: a peer's must be newer
            try:
                sync.state.load_state_dict(pending, reset_local=False)
            except (KeyError, ValueError, TypeError, RuntimeError) as e:
                raise StageError(f"the outer state does not fit stage '{self.backend.name}' ({e})") from None
        self.diloco = sync.start(newer_only=pending is not None)
        self.diloco.listen_next_round = header.get("listen_first") is True
        self._diloco_config = config
        return {"round": self.diloco.state.round}

    async def rpc_info(self, request: Request, context: P2PContext) -> Response:
        """What the expert says of itself (no lease needed; never who holds the lease)."""
        return await self._unary("info", request, context, lambda h, caller: self.info(), leased=lambda h: False)

    async def rpc_claim(self, request: Request, context: P2PContext) -> Response:
        """Grant or renew (``ttl`` > 0, capped at ``max_lease_ttl``) or release (``ttl`` == 0) the lease for the caller.
        Only a free expert is granted, and only the holder renews or releases. Runs on the event loop, so claims
        never race."""

        async def body(header: dict, _: list, caller: str) -> tuple[dict, list]:
            ttl = header.get("ttl", 0.0)
            if not isinstance(ttl, (int, float)) or not 0 <= ttl < float("inf"):
                raise StageError(f"a lease ttl is a number of seconds >= 0, got {ttl!r}")
            holder = self.lease_holder
            if holder is not None and holder != caller:
                return {"granted": False}, []
            if holder != (caller if ttl > 0 else None):
                self._fresh_slots()  # a new holder, or the holder let go: no slot outlives the lease it served
            if ttl > 0:
                self._lease = (caller, time.monotonic() + min(float(ttl), self.config.max_lease_ttl))
                if holder is None:
                    log.info("stage '%s' leased to trainer …%s", self.backend.name, caller[-8:])
                if caller != self._last_holder:  # queued before any call of the new holder can be
                    self._last_holder = caller
                    await self._run(self.backend.new_holder)
            else:
                self._lease = (None, 0.0)
            reply = {"granted": ttl > 0, "ttl": min(float(ttl), self.config.max_lease_ttl),
                     "stage": self.backend.name, "fingerprint": self.backend.fingerprint}
            if self._arena is not None:
                reply["host"] = host_key()  # a caller on this host may send and take tensors through shared memory
            return reply, []

        reply, _, _ = await self._answer("claim", context, self._unary_request(request), body, leased=lambda h: False)
        return next(pack(Response, reply))

    def info(self) -> dict[str, Any]:
        return {
            "stage": self.backend.name,
            "fingerprint": self.backend.fingerprint,
            "peer_id": self.peer_id,
            "leased": self.lease_holder is not None,
            "throughput": self.backend.throughput,
            "requests_served": self.requests_served,
            "requests_failed": self.requests_failed,
            "qat": list(self.backend.qat) if self.backend.qat else None,
            "fake_quantized_linears": _fake_quantized(self.backend.module),
        }


def _float_mode(flush_denormal: bool) -> None:
    """The stage worker thread's float mode (per thread on x86: set where the stage computes)."""
    import torch

    torch.set_flush_denormal(flush_denormal)


def _always(header: dict) -> bool:
    return True


def _changes_state(header: dict) -> bool:
    return bool(header.get("training", True)) or bool(header.get("need_grad", True))


def _decoded(header: dict, tensors: list, max_bytes: int) -> list:
    """The request's tensors, decoded if the trainer sent them through a wire codec (the codec headers are checked
    against the tensors, and their decoded size against ``max_bytes``, before anything is allocated)."""
    if "enc" not in header:
        return tensors
    try:
        return decode_all(header["enc"], tensors, max_bytes)
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise StageError(f"could not decode the request's tensors ({type(e).__name__}: {e})") from None


def _encoded(reply: dict, header: dict, tensors: list, where: str) -> tuple[dict, list]:
    """Encode the reply's tensors with the codec the trainer asked for (``reply_codec``), if any."""
    codec = header.get("reply_codec")
    if not codec or codec.get("c", "none") == "none":
        return reply, tensors
    block = codec.get("block", 64)
    if not isinstance(block, int) or not 2 <= block <= 2**16:
        raise StageError(f"reply_codec block {block!r} is not in [2, 65536]")
    try:
        headers, flat = encode_all(tensors, check_codec(codec.get("c"), "reply_codec"), block, where)
    except ValueError as e:
        raise StageError(str(e)) from None
    return {**reply, "enc": headers}, flat


def _fake_quantized(module: Any) -> int:
    from lightning_distqat.quant.qat import fake_quantized_linears

    return fake_quantized_linears(module)
