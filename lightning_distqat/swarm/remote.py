"""The trainer's side of a stage: a handle that calls one expert's RPCs with timeouts, and ``RemoteStage``, the
``nn.Module`` that stands in for a stage submodule and routes forward and backward through that expert."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as wait_futures
from typing import Any, Mapping, Optional, Protocol, Sequence, Union

import torch
from hivemind.p2p import P2P, P2PDaemonError, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2
from torch import nn
from torch.autograd.function import once_differentiable

from lightning_distqat.quant.codecs import decode_all, encode_all, payload_bytes
from lightning_distqat.swarm.auth import AccessToken
from lightning_distqat.swarm.dht import AsyncRunner
from lightning_distqat.swarm.messages import (
    LayoutError, flatten_structure, pack, pack_structure, parts_to_state, state_to_parts, state_to_tensor,
    tensor_to_state, unpack, unpack_stream,
)
from lightning_distqat.swarm.overlap import waiting
from lightning_distqat.swarm.session import Session
from lightning_distqat.swarm.sharedwire import Arena, SharedWireError, SlotReader, host_key

__all__ = ["ExpertError", "ExpertUnavailableError", "ExpertLeavingError", "ExpertHandle", "RemoteStage", "Route"]

log = logging.getLogger(__name__)

Answer = tuple[Optional[dict[str, Any]], list[torch.Tensor]]

_UNREACHABLE = (P2PDaemonError, P2PHandlerError, ConnectionError, asyncio.IncompleteReadError, EOFError, OSError)
"""What hivemind's P2P layer raises when a call does not go through (a dead peer, a reset stream, a broken daemon)."""


SESSION_OPS = frozenset({"forward", "backward", "step", "grad_norm", "get_state", "set_state"})
"""Calls that travel on the session stream when sessions are on (claims, configure, info, DiLoCo control do not)."""


class ExpertError(RuntimeError):
    """An expert answered a request with an error (bad input, bad state, a failure inside the stage)."""

    stage: Optional[str] = None
    """The stage of the expert that failed (set when a handle raises it)."""
    peer_id: Optional[str] = None


class ExpertUnavailableError(ExpertError):
    """An expert did not answer in time or could not be reached: it may have died or its link is too slow.

    The trainer's pipeline then replaces it (see ``RemotePipeline.recover``); raise ``SwarmConfig.request_timeout``
    for slow links.
    """


class ExpertLeavingError(ExpertUnavailableError):
    """The expert is shutting down (SIGTERM): it takes no new work but still gives its lease holder its state."""


class _EmptyReply(ExpertUnavailableError):
    """A call whose P2P stream ended before the whole answer came."""


class ExpertHandle:
    """Calls to one expert (one stage on one peer). Every call has a timeout and raises :class:`ExpertError` or
    :class:`ExpertUnavailableError` naming the stage, the expert and the cause."""

    def __init__(self, stage: str, peer_id: str, p2p: P2P, runner: AsyncRunner, *, timeout: float,
                 access: Optional[str] = None, experiment: str = "", shared_memory: bool = True,
                 sessions: bool = True) -> None:
        """``access``: the experiment's access token, if it has one (every request then carries a proof bound to
        this trainer's and the expert's peer ids). ``shared_memory``: once a claim shows the expert runs on this
        host (same boot and user), tensors of streamed calls go through shared memory (``sharedwire``).
        ``sessions``: forward, backward, step, grad_norm, get_state and set_state travel on one long-lived stream
        (``session.Session``) instead of a new stream each."""
        from lightning_distqat.expert.servicer import ExpertServicer  # the servicer defines the RPC names

        self.stage, self.peer_id, self.timeout = stage, peer_id, timeout
        self._proof = {"proof": AccessToken(access, experiment).proof(p2p.peer_id.to_base58(), peer_id)} if access \
            else {}
        self._runner = runner
        self.activations: tuple[str, int] = ("none", 0)
        """Wire codec and block size of this stage's inputs and outputs (set from QuantConfig by the strategy)."""
        self.gradients: tuple[str, int] = ("none", 0)
        self.bytes_sent = 0
        """Tensor bytes of forward/backward requests sent to this expert (after encoding)."""
        self.bytes_received = 0
        self._p2p, self._peer = p2p, PeerID.from_base58(peer_id)
        self._stub = ExpertServicer.get_stub(p2p, self._peer)
        self._session_handle = ExpertServicer._get_handle_name(None, "rpc_session")  # hivemind's name of the RPC
        self.shared_memory = shared_memory
        self._arena: Optional[Arena] = None
        """Slots for this expert's requests, from the first claim that shows it shares this host."""
        self._reader: Optional[SlotReader] = None
        self.sessions = sessions
        self._session: Optional[Session] = None
        self._session_lock: Optional[asyncio.Lock] = None
        self.sessions_opened = 0
        self.grad_norm_calls = 0
        self._closed = False
        self.norm_type: Optional[float] = None
        """Set (by the pipeline, when the trainer clips gradients by norm): every backward asks for the stage's
        gradient norm of this type in its answer, so clipping needs no ``grad_norm`` call."""
        self._norm: Optional[tuple[int, float, float]] = None
        self._norm_lock = threading.Lock()
        self._steps_in_flight: list[Future] = []

    @property
    def shares_memory(self) -> bool:
        """True when tensors to and from this expert go through shared memory."""
        return self._arena is not None

    def close(self) -> None:
        """Close the session stream, unlink this handle's shared-memory slots and unmap the expert's (after its
        lease was given back). Later calls fail as unavailable until a claim is granted again."""
        self._closed = True
        self._end_session()
        arena, reader, self._arena, self._reader = self._arena, self._reader, None, None
        if arena is not None:
            arena.close()
        if reader is not None:
            reader.close()

    def __repr__(self) -> str:
        return f"ExpertHandle(stage={self.stage!r}, peer={self.peer_id[-8:]})"

    def _end_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            try:
                self._runner.run(session.close(), 10)
            except Exception as e:  # noqa: BLE001 - a stopped runner or a stuck stream: nothing more to close
                log.debug("%s: closing the session: %s", self, e)

    async def _live_session(self) -> Session:
        """The open session (a new one if there is none or it broke). Calls that wait here keep their order."""
        if self._session_lock is None:
            self._session_lock = asyncio.Lock()
        async with self._session_lock:
            if self._closed:
                raise ConnectionError("this handle was closed (its lease was given back)")
            session = self._session
            if session is None or session.broken is not None:
                if session is not None:
                    await session.close()
                session = Session(self._p2p, self._peer, self._session_handle, self._reader)
                await session.open()
                self._session = session
                self.sessions_opened += 1
            return session

    async def _over_session(self, messages: list[runtime_pb2.ExpertRequest]
                            ) -> tuple[Optional[dict[str, Any]], list[torch.Tensor]]:
        session = await self._live_session()
        return await session.send(messages)

    def _fail(self, what: str, cause: str, unavailable: bool = False, leaving: bool = False) -> ExpertError:
        cls = ExpertLeavingError if leaving else ExpertUnavailableError if unavailable else ExpertError
        error = cls(f"stage '{self.stage}' on expert …{self.peer_id[-8:]}: {what} failed: {cause}")
        error.stage, error.peer_id = self.stage, self.peer_id
        return error

    def _call(self, what: str, coro: Any, timeout: Optional[float] = None, session: bool = False
              ) -> tuple[dict[str, Any], list[torch.Tensor]]:
        return self._result(what, asyncio.run_coroutine_threadsafe(coro, self._runner.loop), timeout, session)

    def _result(self, what: str, future: "Future[Answer]", timeout: Optional[float] = None, session: bool = False
                ) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """The answer of a call in flight (``future`` on the runner's loop), or the error it ended in; ``session``:
        it went on the session stream (which a timeout then ends)."""
        timeout = self.timeout if timeout is None else timeout
        try:
            with waiting():  # other micro-batches run meanwhile
                header, tensors = future.result(timeout)
        except CancelledError:  # another thread gave up on this call (a step that two micro-batches wait for)
            raise self._fail(what, "the call was given up (timed out)", unavailable=True) from None
        except (TimeoutError, FutureTimeout):
            future.cancel()
            if session:
                self._end_session()  # the calls behind a stuck one would wait too: the next call opens a new stream
            raise self._fail(
                what, f"no answer within {timeout:.0f}s; the expert may have died (raise request_timeout for slow links)",
                unavailable=True,
            ) from None
        except _UNREACHABLE as e:
            raise self._fail(what, f"{type(e).__name__}: {e}", unavailable=True) from e
        if header is None:
            error = _EmptyReply(self._fail(what, "the connection closed before the whole answer came; the expert may "
                                                 "have died", unavailable=True))
            error.stage, error.peer_id = self.stage, self.peer_id
            raise error
        if "error" in header:
            raise self._fail(what, header["error"], leaving=header.get("leaving") is True)
        return header, tensors

    def _unary(self, method: str, header: dict[str, Any], timeout: Optional[float] = None) -> dict[str, Any]:
        op = method.removeprefix("rpc_")
        if op in ("configure", "diloco"):  # these act on the state that the steps in flight change: after them
            self._wait_for_steps(self.timeout if timeout is None else timeout)
        return self._call(op, self._unary_call(method, header), timeout, self.sessions and op in SESSION_OPS)[0]

    def _unary_call(self, method: str, header: dict[str, Any]) -> Any:
        """The coroutine of a call without tensors: on the session (for its ops, when sessions are on), else as a
        unary RPC."""
        op = method.removeprefix("rpc_")
        if self.sessions and op in SESSION_OPS:
            return self._over_session(list(pack(runtime_pb2.ExpertRequest, {**header, **self._proof, "op": op})))

        async def _go() -> tuple[dict[str, Any], list[torch.Tensor]]:
            (request,) = pack(runtime_pb2.ExpertRequest, {**header, **self._proof})
            response = await getattr(self._stub, method)(request)
            return unpack([response])

        return _go()

    def _wait_for_steps(self, timeout: float) -> None:
        with self._norm_lock:
            steps, self._steps_in_flight = self._steps_in_flight, []
        wait_futures(steps, timeout)  # their outcome is the pipeline's to read (step_result)

    def _stream(
        self, method: str, header: dict[str, Any], tensors: Sequence[torch.Tensor], timeout: Optional[float] = None
    ) -> tuple[dict[str, Any], list[torch.Tensor]]:
        arena, reader = self._arena, self._reader
        slot = None
        if arena is not None and reader is not None:
            header = {**header, "reply_shm": True}
            written = arena.write(tensors) if tensors else None
            if written is not None:
                slot, ticket = written
                header, tensors = {**header, "shm": ticket}, []
        op = method.removeprefix("rpc_")
        if self.sessions:
            header = {**header, "op": op}
        messages = list(pack(runtime_pb2.ExpertRequest, {**header, **self._proof}, tensors))

        async def _requests():  # noqa: ANN202
            for message in messages:
                yield message

        async def _go() -> tuple[dict[str, Any], list[torch.Tensor]]:
            reply = await getattr(self._stub, method)(_requests())
            try:
                return await unpack_stream(reply, reader) if hasattr(reply, "__aiter__") else unpack([reply])
            except SharedWireError:  # the expert's slot went away or was rewritten: as if the answer was cut short
                return None, []

        done = False
        try:
            result = self._call(op, self._over_session(messages) if self.sessions else _go(), timeout,
                                self.sessions)
            done = True
            return result
        finally:
            if slot is not None:  # the expert has copied the request once it answered; else it may still read it
                (arena.release if done else arena.retire)(slot)

    # ------------------------------------------------------------------ RPCs
    def forward(
        self, request_id: str, layout: dict[str, Any], tensors: Sequence[torch.Tensor], *, training: bool, need_grad: bool
    ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """Run the stage on ``(layout, tensors)`` (see ``messages.flatten_structure``). Returns the output tensors and
        the layout of the stage's output."""
        header = {"request_id": request_id, "layout": layout, "training": training, "need_grad": need_grad}
        header, tensors = self._encode(header, tensors, self.activations, f"stage '{self.stage}' input")
        reply, outputs = self._stream_twice("rpc_forward", header, tensors)
        return self._decode(reply, outputs), reply["layout"]

    def _stream_twice(self, method: str, header: dict[str, Any], tensors: Sequence[torch.Tensor]
                      ) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """:meth:`_stream`, once more if the P2P stream ended without a whole answer while the expert may be alive (a
        broken link). Safe for forward (the expert stores the context under the same request id), backward (it answers
        a repeated backward from its last answers) and get/set_state."""
        try:
            return self._stream(method, header, tensors)
        except _EmptyReply as e:
            log.warning("%s; trying once more", e)
            return self._stream(method, header, tensors)

    def _encode(self, header: dict[str, Any], tensors: Sequence[torch.Tensor], codec: tuple[str, int], where: str
                ) -> tuple[dict[str, Any], list[torch.Tensor]]:
        if codec[0] != "none":
            headers, tensors = encode_all(list(tensors), codec[0], codec[1], where)
            header = {**header, "enc": headers, "reply_codec": {"c": codec[0], "block": codec[1]}}
        self.bytes_sent += payload_bytes(list(tensors))
        return header, list(tensors)

    def _decode(self, reply: dict[str, Any], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        self.bytes_received += payload_bytes(tensors)
        if "enc" not in reply:
            return tensors
        try:
            return decode_all(reply["enc"], tensors)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise self._fail("decoding", f"the expert's reply does not match its codec headers ({e})") from None

    def backward(self, request_id: str, grad_outputs: Sequence[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        """Backpropagate ``grad_outputs`` through forward ``request_id``; returns its input grads (None for inputs
        that need none). With :attr:`norm_type` set, the answer brings the stage's gradient norm after this backward
        (see :meth:`norm_after_backward`)."""
        header = {"request_id": request_id} if self.norm_type is None else {"request_id": request_id,
                                                                            "norm": self.norm_type}
        header, tensors = self._encode(header, grad_outputs, self.gradients, f"gradient of stage '{self.stage}' output")
        reply, grads = self._stream_twice("rpc_backward", header, tensors)
        norm, count = reply.get("norm"), reply.get("n")
        if self.norm_type is not None and isinstance(norm, float) and isinstance(count, int):
            with self._norm_lock:  # concurrent micro-batches: the answer of the expert's latest backward wins
                if self._norm is None or self._norm[0] < count:
                    self._norm = (count, self.norm_type, norm)
        grads = self._decode(reply, grads)
        it = iter(grads)
        return [next(it) if present else None for present in reply["present"]]

    def configure(self, optimizers: dict[int, dict[str, Any]], qat: Optional[dict[str, Any]] = None) -> None:
        """Create the stage's optimizers; ``qat`` (``{"scheme", "group_size"}``) first prepares torchao QAT."""
        self._unary("rpc_configure", {"optimizers": {str(i): spec for i, spec in optimizers.items()}, "qat": qat})

    def norm_after_backward(self, norm_type: float) -> Optional[float]:
        """The stage's gradient norm (of ``norm_type``) as the latest backward's answer brought it, or None (no
        backward since the last step, or another norm type)."""
        with self._norm_lock:
            norm = self._norm
        return norm[2] if norm is not None and norm[1] == norm_type else None

    def step(self, index: int, groups: list[dict[str, Any]], *, clip_norm: Optional[tuple[float, float]] = None,
             clip_value: Optional[float] = None) -> None:
        """One inner step of optimizer ``index`` with the groups' current hyperparameters; ``clip_norm`` is
        ``(max_norm, total_norm over every stage)``. An update the expert skipped (gradients that are not finite) is
        logged as a warning."""
        self.step_result(self.send_step(index, groups, clip_norm=clip_norm, clip_value=clip_value))

    def send_step(self, index: int, groups: list[dict[str, Any]], *,
                  clip_norm: Optional[tuple[float, float]] = None, clip_value: Optional[float] = None
                  ) -> "Future[Answer]":
        """:meth:`step` without waiting for it: returns the call in flight, for :meth:`step_result`. On a session
        it lands before any later call of this handle; without one, before its later ``configure`` and ``diloco``
        calls only (the pipeline waits for it before its next call to this expert)."""
        with self._norm_lock:
            self._norm = None  # the step zeroes the gradients
        header = {"index": index, "groups": groups, "clip_norm": clip_norm, "clip_value": clip_value}
        future = asyncio.run_coroutine_threadsafe(self._unary_call("rpc_step", header), self._runner.loop)
        with self._norm_lock:
            self._steps_in_flight = [f for f in self._steps_in_flight if not f.done()] + [future]
        return future

    def step_result(self, future: "Future[Answer]", timeout: Optional[float] = None) -> None:
        """Wait for a step sent by :meth:`send_step`; raises as :meth:`step` would."""
        reply = self._result("step", future, timeout, self.sessions)[0]
        if reply.get("skipped"):
            log.warning("%s", reply["skipped"])

    def grad_norm(self, norm_type: float) -> float:
        self.grad_norm_calls += 1
        return float(self._unary("rpc_grad_norm", {"norm_type": norm_type})["norm"])

    def get_state(self, parts: Optional[list[str]] = None) -> dict[str, Any]:
        """The stage's ``{"module": state dict, "optimizers": {index: state by parameter name}}``, plus ``"diloco"``
        (its outer state) while DiLoCo runs; ``parts`` picks some of them."""
        reply, tensors = self._stream_twice("rpc_get_state", {"parts": parts} if parts else {}, [])
        try:
            if "state" in reply:
                return parts_to_state(reply["state"], tensors)
            if len(tensors) == 1:
                return tensor_to_state(tensors[0])
        except Exception as e:  # noqa: BLE001 - what the expert sent does not load: say so, naming it
            raise self._fail("get_state", f"its state does not load ({type(e).__name__}: {e})") from None
        raise self._fail("get_state", f"the answer holds {len(tensors)} tensors and no state skeleton")

    def set_state(self, state: dict[str, Any]) -> None:
        """Load (part of) what :meth:`get_state` returns into the stage."""
        try:
            skeleton, tensors = state_to_parts(state)
        except LayoutError:  # something other than tensors and plain values: as one torch.save blob
            self._stream_twice("rpc_set_state", {}, [state_to_tensor(state)])
            return
        self._stream_twice("rpc_set_state", {"state": skeleton}, tensors)

    def diloco(self, op: str, timeout: Optional[float] = None, **fields: Any) -> dict[str, Any]:
        """DiLoCo control on the expert (see ``ExpertServicer.rpc_diloco``)."""
        return self._unary("rpc_diloco", {"op": op, **fields}, timeout)

    def info(self, timeout: Optional[float] = None) -> dict[str, Any]:
        """What the expert says of itself: stage, fingerprint, lease holder, throughput, requests, QAT."""
        return self._unary("rpc_info", {}, timeout)

    def claim(self, ttl: float, timeout: Optional[float] = None) -> dict[str, Any]:
        """Ask for (or renew) this expert's lease for this trainer (its libp2p identity). Returns ``{"granted": bool,
        "ttl", "stage", "fingerprint"}``: the expert's own word on what it serves."""
        reply = self._unary("rpc_claim", {"ttl": ttl}, timeout)
        if reply.get("granted"):
            self._closed = False  # claimed (again): calls may open a session
        if (reply.get("granted") and self.shared_memory and self._arena is None and reply.get("host")
                and reply.get("host") == host_key()):
            self._arena, self._reader = Arena(), SlotReader()
        return reply

    def release(self, timeout: Optional[float] = None) -> None:
        """Give the lease back (only its holder can)."""
        self._unary("rpc_claim", {"ttl": 0.0}, timeout)


class Route(Protocol):
    """Where a ``RemoteStage`` sends its calls: the trainer's pipeline (which replaces experts that die and replays
    what they lost), or :class:`_Direct` over a plain mapping of handles."""

    def forward(self, stage: str, request_id: str, layout: dict[str, Any], tensors: Sequence[torch.Tensor], *,
                training: bool, need_grad: bool) -> tuple[list[torch.Tensor], dict[str, Any]]: ...

    def backward(self, stage: str, request_id: str, grad_outputs: Sequence[torch.Tensor]
                 ) -> list[Optional[torch.Tensor]]: ...

    def describe_stage(self, stage: str) -> str: ...


class _Direct:
    """A :class:`Route` straight to ``handles[stage]``, with no failover."""

    def __init__(self, handles: Mapping[str, ExpertHandle]) -> None:
        self.handles = handles

    def forward(self, stage: str, request_id: str, layout: dict[str, Any], tensors: Sequence[torch.Tensor], *,
                training: bool, need_grad: bool) -> tuple[list[torch.Tensor], dict[str, Any]]:
        return self.handles[stage].forward(request_id, layout, tensors, training=training, need_grad=need_grad)

    def backward(self, stage: str, request_id: str, grad_outputs: Sequence[torch.Tensor]
                 ) -> list[Optional[torch.Tensor]]:
        return self.handles[stage].backward(request_id, grad_outputs)

    def describe_stage(self, stage: str) -> str:
        return f"expert=…{self.handles[stage].peer_id[-8:]}"


class _RemoteCall(torch.autograd.Function):
    """Forward runs the stage on its expert; backward sends output grads to the stage under the same request id (to
    the expert that ran the forward, or to the one that replaced it and replayed that forward)."""

    @staticmethod
    def forward(ctx, dummy, route, stage, layout, training, reply, *tensors):  # noqa: ANN001, ANN205
        request_id = uuid.uuid4().hex
        outputs, reply["layout"] = route.forward(stage, request_id, layout, tensors, training=training,
                                                 need_grad=True)
        ctx.route, ctx.stage, ctx.request_id = route, stage, request_id
        ctx.inputs = [(t.device, t.dtype) for t in tensors]
        outputs = [o.to(dummy.device) for o in outputs]
        ctx.mark_non_differentiable(*[o for o in outputs if not o.is_floating_point()])
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs):  # noqa: ANN001, ANN205
        grads = ctx.route.backward(ctx.stage, ctx.request_id, [g.contiguous() for g in grad_outputs])
        grads = [g.to(device=d, dtype=t) if g is not None else None for g, (d, t) in zip(grads, ctx.inputs)]
        return (None, None, None, None, None, None, *grads)


class RemoteStage(nn.Module):
    """Stands in for a stage submodule: the same call signature (tensors, plain values, and tuples, lists and dicts
    of them), computed on the expert that serves the stage at call time. ``route``: the trainer's pipeline, or a
    mapping of handles by stage (no failover)."""

    def __init__(self, name: str, route: Union[Route, Mapping[str, ExpertHandle]]) -> None:
        super().__init__()
        self.stage_name = name
        self._route: Route = _Direct(route) if isinstance(route, Mapping) else route
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    def extra_repr(self) -> str:
        return f"stage={self.stage_name!r}, {self._route.describe_stage(self.stage_name)}"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            layout, tensors = flatten_structure((args, kwargs), "the call")
        except LayoutError as e:
            raise TypeError(f"RemoteStage '{self.stage_name}': {e}. Pass those, or keep this submodule local (leave it "
                            "out of stages).") from None
        device = self._device_anchor.device
        if torch.is_grad_enabled():
            dummy = torch.empty(0, device=device, requires_grad=True)
            reply: dict[str, Any] = {}
            outputs = _RemoteCall.apply(dummy, self._route, self.stage_name, layout, self.training, reply, *tensors)
            out_layout = reply["layout"]
        else:
            outputs, out_layout = self._route.forward(self.stage_name, uuid.uuid4().hex, layout, tensors,
                                                      training=self.training, need_grad=False)
            outputs = [o.to(device) for o in outputs]
        return pack_structure(out_layout, outputs)
