"""The expert's RPCs over hivemind P2P. Every handler answers; a failing request gets an error reply naming the
stage, and the expert goes on serving the next request."""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from dataclasses import asdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import runtime_pb2

from lightning_distqat.diloco.config import DiLoCoConfig
from lightning_distqat.diloco.sync import DiLoCoSync
from lightning_distqat.expert.backend import StageBackend, StageError
from lightning_distqat.quant.codecs import check_codec, decode_all, encode_all
from lightning_distqat.swarm.messages import linger, pack, state_to_tensor, tensor_to_state, unpack, unpack_stream

__all__ = ["ExpertServicer"]

log = logging.getLogger(__name__)
Request, Response = runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse
Body = Callable[[dict, list], Awaitable[tuple[dict, list]]]


async def _parse(request: Request) -> tuple[dict, list]:
    return unpack([request])


class ExpertServicer(ServicerBase):
    """RPC handlers of one expert. Stage computations run one at a time on a single worker thread."""

    def __init__(
        self, backend: StageBackend, peer_id: str = "", *, make_sync: Optional[Callable[[DiLoCoConfig, bool], DiLoCoSync]] = None
    ) -> None:
        self.backend = backend
        self.peer_id = peer_id
        self._make_sync = make_sync
        self.diloco: Optional[DiLoCoSync] = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="distqat-stage")
        self._lease: tuple[Optional[str], float] = (None, 0.0)
        self.requests_served = 0
        self.requests_failed = 0

    def shutdown(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
        if self.diloco is not None:
            self.diloco.shutdown()
            self.diloco = None

    @property
    def lease_holder(self) -> Optional[str]:
        holder, until = self._lease
        return holder if holder is not None and time.monotonic() < until else None

    # ------------------------------------------------------------------ plumbing
    async def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, lambda: fn(*args, **kwargs))

    def _check_lease(self, header: dict[str, Any]) -> None:
        holder = self.lease_holder
        if holder is not None and header.get("trainer") != holder:
            raise StageError(f"expert is leased to trainer {holder}; claim a free expert")

    def _error(self, what: str, e: BaseException) -> dict[str, Any]:
        self.requests_failed += 1
        if isinstance(e, StageError):
            cause = str(e)
        else:
            cause = f"{type(e).__name__}: {e}"
            log.warning("stage '%s' %s failed:\n%s", self.backend.name, what, traceback.format_exc())
        return {"error": f"{cause} (stage '{self.backend.name}', expert …{self.peer_id[-8:]})"}

    async def _answer(
        self, what: str, parsed: Awaitable[tuple[dict, list]], body: Body, *, leased: bool = True
    ) -> tuple[dict, list]:
        """Parse the request, run ``body(header, tensors)`` and turn any failure into an error reply.

        ``leased`` calls are refused to trainers that do not hold this expert's lease.
        """
        try:
            header, tensors = await parsed
            if header is None:
                raise StageError("empty request")
            if leased:
                self._check_lease(header)
            reply, out = await body(header, tensors)
            self.requests_served += 1
            return reply or {}, out
        except Exception as e:  # noqa: BLE001 - one bad request must never stop the expert
            return self._error(what, e), []

    async def _streamed(self, what: str, parsed: Awaitable[tuple[dict, list]], body: Body, *, leased: bool = True
                        ) -> AsyncIterator[Response]:
        """:meth:`_answer` as a streamed reply that the caller closes (see ``messages.linger``)."""
        async for message in linger(pack(Response, *await self._answer(what, parsed, body, leased=leased))):
            yield message

    # ------------------------------------------------------------------ tensor RPCs (streamed)
    async def rpc_forward(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        async def body(header: dict, tensors: list) -> tuple[dict, list]:
            tensors = _decoded(header, tensors)
            outputs, layout = await self._run(
                self.backend.forward, header["request_id"], header["layout"], tensors,
                training=bool(header["training"]), need_grad=bool(header["need_grad"]),
            )
            return _encoded({"layout": layout}, header, outputs, f"stage '{self.backend.name}' output")

        async for message in self._streamed("forward", unpack_stream(requests), body):
            yield message

    async def rpc_backward(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        async def body(header: dict, grad_outputs: list) -> tuple[dict, list]:
            grads = await self._run(self.backend.backward, header["request_id"], _decoded(header, grad_outputs))
            return _encoded({"present": [g is not None for g in grads]}, header, [g for g in grads if g is not None],
                            f"stage '{self.backend.name}' input gradient")

        async for message in self._streamed("backward", unpack_stream(requests), body):
            yield message

    async def rpc_get_state(self, request: Request, context: P2PContext) -> AsyncIterator[Response]:
        async def body(header: dict, _: list) -> tuple[dict, list]:
            return {}, [state_to_tensor(await self._run(self.backend.get_state))]

        async for message in self._streamed("get_state", _parse(request), body, leased=False):
            yield message

    async def rpc_set_state(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        async def body(header: dict, tensors: list) -> tuple[dict, list]:
            if len(tensors) != 1:
                raise StageError(f"set_state expects one serialized state, got {len(tensors)} tensors")
            await self._run(self.backend.set_state, tensor_to_state(tensors[0]))
            return {}, []

        async for message in self._streamed("set_state", unpack_stream(requests), body):
            yield message

    # ------------------------------------------------------------------ control RPCs (unary)
    async def _unary(self, what: str, request: Request, fn: Callable[[dict], Any], *, leased: bool = True) -> Response:
        async def body(header: dict, _: list) -> tuple[dict, list]:
            return (await self._run(fn, header)) or {}, []

        return next(pack(Response, (await self._answer(what, _parse(request), body, leased=leased))[0]))

    async def rpc_configure(self, request: Request, context: P2PContext) -> Response:
        def fn(header: dict) -> None:
            qat = header.get("qat")
            if qat:
                self.backend.prepare_qat(qat["scheme"], int(qat["group_size"]))
            for index, spec in header["optimizers"].items():
                self.backend.configure_optimizer(int(index), spec)

        return await self._unary("configure", request, fn)

    async def rpc_step(self, request: Request, context: P2PContext) -> Response:
        def fn(header: dict) -> None:
            self.backend.step(
                int(header["index"]), header["groups"],
                clip_norm=header.get("clip_norm"), clip_value=header.get("clip_value"),
            )

        return await self._unary("step", request, fn)

    async def rpc_grad_norm(self, request: Request, context: P2PContext) -> Response:
        return await self._unary("grad_norm", request, lambda h: {"norm": self.backend.grad_norm(float(h["norm_type"]))})

    async def rpc_diloco(self, request: Request, context: P2PContext) -> Response:
        """DiLoCo control: ``{"op": "start", "config": {...}, "solo": bool}`` joins the stage's averaging group (and loads the
        current outer state from a peer); ``{"op": "round", "samples": n}`` runs one outer round;
        ``{"op": "finish"}`` resets the local params to the outer params."""

        def fn(header: dict) -> Any:
            op = header.get("op")
            if op == "start":
                if self._make_sync is None:
                    raise StageError("this expert cannot run DiLoCo (no DHT to average over)")
                if self.diloco is None:
                    solo = bool(header.get("solo", False))
                    self.diloco = self._make_sync(DiLoCoConfig(**header["config"]), solo).start()
                return {"round": self.diloco.state.round}
            if self.diloco is None:
                raise StageError(f"DiLoCo op {op!r} before 'start'")
            if op == "round":
                return {**asdict(self.diloco.round(float(header["samples"]))), "checksum": self.diloco.state.checksum()}
            if op == "finish":
                self.diloco.state.copy_to_local()
                return {"round": self.diloco.state.round}
            raise StageError(f"unknown DiLoCo op {op!r}")

        return await self._unary("diloco", request, fn)

    async def rpc_info(self, request: Request, context: P2PContext) -> Response:
        return await self._unary("info", request, lambda h: self.info(), leased=False)

    async def rpc_claim(self, request: Request, context: P2PContext) -> Response:
        """Grant, renew (ttl > 0) or release (ttl == 0) the lease. Runs on the event loop: no races with itself."""

        async def body(header: dict, _: list) -> tuple[dict, list]:
            claimant, ttl = header.get("claimant"), float(header.get("ttl", 0.0))
            if not isinstance(claimant, str):
                raise StageError("claim needs a claimant id")
            holder = self.lease_holder
            if holder is not None and holder != claimant:
                return {"granted": False, "holder": holder}, []
            if ttl > 0:
                if holder is None:
                    log.info("stage '%s' leased to trainer %s", self.backend.name, claimant)
                self._lease = (claimant, time.monotonic() + ttl)
            else:
                self._lease = (None, 0.0)
            return {"granted": ttl > 0, "holder": self.lease_holder}, []

        return next(pack(Response, (await self._answer("claim", _parse(request), body, leased=False))[0]))

    def info(self) -> dict[str, Any]:
        return {
            "stage": self.backend.name,
            "fingerprint": self.backend.fingerprint,
            "peer_id": self.peer_id,
            "lease_holder": self.lease_holder,
            "throughput": self.backend.throughput,
            "requests_served": self.requests_served,
            "requests_failed": self.requests_failed,
            "qat": list(self.backend.qat) if self.backend.qat else None,
            "fake_quantized_linears": _fake_quantized(self.backend.module),
        }


def _decoded(header: dict, tensors: list) -> list:
    """The request's tensors, decoded if the trainer sent them through a wire codec."""
    if "enc" not in header:
        return tensors
    try:
        return decode_all(header["enc"], tensors)
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise StageError(f"could not decode the request's tensors ({type(e).__name__}: {e})") from None


def _encoded(reply: dict, header: dict, tensors: list, where: str) -> tuple[dict, list]:
    """Encode the reply's tensors with the codec the trainer asked for (``reply_codec``), if any."""
    codec = header.get("reply_codec")
    if not codec or codec.get("c", "none") == "none":
        return reply, tensors
    headers, flat = encode_all(tensors, check_codec(codec["c"], "reply_codec"), int(codec.get("block", 64)), where)
    return {**reply, "enc": headers}, flat


def _fake_quantized(module: Any) -> int:
    from lightning_distqat.quant.qat import fake_quantized_linears

    return fake_quantized_linears(module)
