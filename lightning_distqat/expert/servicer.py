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

from lightning_distqat.config import ExpertConfig
from lightning_distqat.diloco.config import DiLoCoConfig
from lightning_distqat.diloco.pace import parse_pace
from lightning_distqat.diloco.sync import DiLoCoSync
from lightning_distqat.expert.backend import StageBackend, StageError
from lightning_distqat.quant.codecs import check_codec, decode_all, encode_all
from lightning_distqat.swarm.auth import ACCESS_DENIED, AccessToken
from lightning_distqat.swarm.messages import (
    Malformed, TooLarge, collect, linger, pack, state_to_tensor, tensor_to_state, unpack,
)
from lightning_distqat.swarm.sharedwire import Arena, SlotReader, host_key

__all__ = ["ExpertServicer"]

log = logging.getLogger(__name__)
Request, Response = runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse
Body = Callable[[dict, list, str], Awaitable[tuple[dict, list]]]
class Leaving(StageError):
    """The expert is leaving (SIGTERM) and takes no new work."""


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
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="distqat-stage")
        self._lease: tuple[Optional[str], float] = (None, 0.0)
        self._last_holder: Optional[str] = None
        self.leaving = False
        self._pending_outer: Optional[dict[str, Any]] = None
        """Set on SIGTERM: only ``info``, the lease holder's ``get_state`` and its release are served."""
        self._in_flight: dict[str, int] = {}
        self.requests_served = 0
        self.requests_failed = 0
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

    def _slowed(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, taking ``ExpertConfig.slowdown`` times as long (the test hook; on the worker)."""
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if self.config.slowdown > 1:
                time.sleep((self.config.slowdown - 1) * (time.perf_counter() - started))

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
        slot, arena = None, self._arena
        try:
            reply, out, shared = await self._answer(what, context, receive, body, leased=leased, admitted=True)
            arena = self._arena
            if shared and out and arena is not None:
                written = await self._run(arena.write, out)
                if written is not None:
                    slot, ticket = written
                    reply, out = {**reply, "shm": ticket}, []
            async for message in linger(pack(Response, reply, out)):
                yield message
        finally:
            self._release(caller)
            if slot is not None and arena is not None:  # the caller copied the answer before it closed the stream
                arena.release(slot)

    # ------------------------------------------------------------------ tensor RPCs (streamed)
    async def rpc_forward(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        """Run the stage. Without the lease only an inference call (no training mode, no gradients) is served."""

        async def body(header: dict, tensors: list, caller: str) -> tuple[dict, list]:
            tensors = await self._run(_decoded, header, tensors, self.config.max_request_bytes)
            outputs, layout = await self._run(
                self._slowed, self.backend.forward, str(header["request_id"]), header["layout"], tensors,
                training=bool(header["training"]), need_grad=bool(header["need_grad"]),
            )
            return _encoded({"layout": layout}, header, outputs, f"stage '{self.backend.name}' output")

        changes_state = lambda h: bool(h.get("training", True)) or bool(h.get("need_grad", True))  # noqa: E731
        async for message in self._streamed("forward", context, self._streamed_request(requests), body,
                                            leased=changes_state):
            yield message

    async def rpc_backward(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        async def body(header: dict, grad_outputs: list, caller: str) -> tuple[dict, list]:
            grads = await self._run(self._slowed, self.backend.backward, str(header["request_id"]),
                                    await self._run(_decoded, header, grad_outputs, self.config.max_request_bytes))
            return _encoded({"present": [g is not None for g in grads]}, header, [g for g in grads if g is not None],
                            f"stage '{self.backend.name}' input gradient")

        async for message in self._streamed("backward", context, self._streamed_request(requests), body,
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

    async def rpc_get_state(self, request: Request, context: P2PContext) -> AsyncIterator[Response]:
        async def body(header: dict, _: list, caller: str) -> tuple[dict, list]:
            return {}, [state_to_tensor(await self._run(self._get_state, header.get("parts")))]

        async for message in self._streamed("get_state", context, self._unary_request(request), body, leased=_always):
            yield message

    async def rpc_set_state(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        async def body(header: dict, tensors: list, caller: str) -> tuple[dict, list]:
            if len(tensors) != 1:
                raise StageError(f"set_state expects one serialized state, got {len(tensors)} tensors")
            await self._run(lambda: self._set_state(tensor_to_state(tensors[0])))
            return {}, []

        async for message in self._streamed("set_state", context, self._streamed_request(requests), body,
                                            leased=_always):
            yield message

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

    async def rpc_step(self, request: Request, context: P2PContext) -> Response:
        def fn(header: dict, caller: str) -> dict[str, Any]:
            skipped = self.backend.step(int(header["index"]), header.get("groups"),
                                        clip_norm=header.get("clip_norm"), clip_value=header.get("clip_value"))
            if skipped:
                log.warning("%s", skipped)
            return {"skipped": skipped} if skipped else {}

        return await self._unary("step", request, context, fn)

    async def rpc_grad_norm(self, request: Request, context: P2PContext) -> Response:
        return await self._unary("grad_norm", request, context,
                                 lambda h, caller: {"norm": self.backend.grad_norm(float(h["norm_type"]))})

    async def rpc_diloco(self, request: Request, context: P2PContext) -> Response:
        """DiLoCo control: ``{"op": "start", "config": {...}, "solo": bool}`` joins the stage's averaging group (and
        loads the current outer state from a peer); a later ``start`` must bring the same config. ``{"op": "round",
        "samples": n}`` runs one outer round; ``{"op": "finish"}`` resets the local params to the outer params."""

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
                return {**asdict(self.diloco.round(samples, pace=pace)), "checksum": self.diloco.state.checksum()}
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


def _always(header: dict) -> bool:
    return True


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
