"""One replica's DiLoCo rounds over hivemind decentralized averaging: one averaging group per experiment and stage;
replicas that do not show up in time are left out; a replica that misses a round or joins late loads the current
outer state from a peer."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import signal
import time
import traceback
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional, Sequence

import torch

from lightning_distqat import _hivemind  # noqa: F401  (imports hivemind quietly, before the lines below do)
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import AveragingStage
from hivemind.averaging.partition import AllreduceException
from hivemind.compression import CompressionInfo, deserialize_torch_tensor
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

from lightning_distqat._process import die_with_parent, exit_with_parent
from lightning_distqat.diloco.pace import parse_pace
from lightning_distqat.diloco.aggregate import Contribution, robust_aggregate
from lightning_distqat.diloco.compression import compressed_bytes, pseudo_gradient_compression
from lightning_distqat.diloco.config import DiLoCoConfig
from lightning_distqat.diloco.outer import OuterState
from lightning_distqat.diloco.presence import Presence
from lightning_distqat.swarm.messages import state_to_tensor, tensor_to_state

__all__ = ["DiLoCoSync", "RoundReport", "catch_up_round", "GONE"]

GONE = "every other replica of the group is gone"
"""How a round that went on alone because its partners' heartbeats stopped says so (``RoundReport.failed``)."""

log = logging.getLogger(__name__)


@dataclass
class RoundReport:
    """What one outer round did."""

    round: int
    group_size: int
    """Replicas that ended the round with the same result: those whose pseudo-gradients were averaged, and listeners
    (a replacement in its first round). 1: this replica alone."""
    bytes_sent: int
    bytes_received: int
    failed: Optional[str] = None
    """Why the exchange failed, when it did (the replica then loaded a peer's newer state or stepped alone)."""
    excluded: dict[str, str] = field(default_factory=dict)
    """Replicas of the group whose contributions were left out (by peer id), and why."""
    paces: list[dict[str, Any]] = field(default_factory=list)
    """The paces the group's members announced for adaptive batch sizing (``diloco/pace.py``), well-formed ones only."""
    skipped: bool = False
    """This replica's outer state was already at the round this part should reach (a replacement that caught up with
    its group ahead of its trainer's other parts): it kept its inner progress and did not average (group size 0)."""


class _Averager(DecentralizedAverager):
    """hivemind's averager for pseudo-gradients; shares the outer state with late joiners; never outlives its host.

    hivemind forms the group (matchmaking over the DHT); the data then goes by an all-gather instead of hivemind's
    butterfly all-reduce: every replica sends its (compressed) pseudo-gradient and weight to every other member
    (``rpc_exchange_pseudo_gradients``) and computes :func:`robust_aggregate` of all of them itself. So no replica
    reduces another's part (a hostile reducer could return anything), one hostile or broken replica is screened out
    or clipped, and replicas that received the same contributions hold bit-identical results. Each round's outcome
    (who went in, who was left out, bytes) goes to the host through a pipe.
    """

    def __init__(self, state_fn: Callable[[], OuterState], config: DiLoCoConfig, *args: Any, **kwargs: Any) -> None:
        self._state_fn = state_fn
        self._diloco = config
        self._host_pid = os.getpid()
        self._outcomes, self._outcome_sender = mp.Pipe(duplex=False)
        self._inbox: dict[bytes, dict[str, tuple[float, list[runtime_pb2.Tensor]]]] = {}
        self._members: dict[bytes, set[str]] = {}
        self._changed: Optional[asyncio.Condition] = None  # made in the averager's own event loop
        super().__init__(*args, **kwargs)

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def _wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait (on arrivals, not the clock) until ``predicate()`` holds or ``timeout`` passes; returns it."""
        condition = self._condition()
        async with condition:
            try:
                await asyncio.wait_for(condition.wait_for(predicate), max(0.0, timeout))
            except asyncio.TimeoutError:
                pass
        return predicate()

    async def _notify(self) -> None:
        condition = self._condition()
        async with condition:
            condition.notify_all()

    def run(self) -> None:
        die_with_parent(signal.SIGTERM)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the host, which shuts this process down
        if os.getppid() != self._host_pid:
            return
        exit_with_parent(self._host_pid)
        super().run()

    def start_here(self, timeout: float) -> None:
        """Start the averaging process and wait until it is ready. Unlike ``run_in_background`` this leaves the
        host's SIGINT handler alone (hivemind sets it to SIG_IGN, which would make the trainer deaf to Ctrl+C)."""
        self.start()
        self.wait_until_ready(timeout)

    def stop(self) -> None:
        """Shut down the averaging process and the host-side state-sharing thread, also if the process died."""
        if self.is_alive():
            self.shutdown()
        else:
            self._inner_pipe.send(("_SHUTDOWN", None))  # what shutdown() sends to that thread

    def get_current_state(self) -> tuple[Any, Sequence[torch.Tensor], None]:
        state = self._state_fn()
        return {"round": state.round}, [state_to_tensor(state.state_dict())], None

    def last_outcome(self) -> Optional[dict[str, Any]]:
        """(Host side) the outcome of the latest round this averager ran, if it sent one since the last call."""
        outcome = None
        while self._outcomes.poll():
            outcome = self._outcomes.recv()
        return outcome

    # ------------------------------------------------------------------ the all-gather (in the averager's process)
    async def _run_allreduce_inplace_(self, tensors: Sequence[torch.Tensor], group_info: Any,
                                      group_id: Optional[bytes] = None, *, weight: Optional[float] = None,
                                      compression: Any = None, **kwargs: Any) -> None:
        group_id = group_info.group_id if group_id is None else group_id
        me = self.peer_id.to_base58()
        members = {p.to_base58() for p in group_info.peer_ids} - {me}
        self._members[group_id] = members
        inbox = self._inbox.setdefault(group_id, {})
        self._running_groups[group_id].set_result(None)  # hivemind's bookkeeping: this group runs
        await self._notify()
        try:
            loop = asyncio.get_running_loop()
            mine = await loop.run_in_executor(None, lambda: [compression.compress(t, CompressionInfo.from_tensor(t))
                                                              for t in tensors])
            weight = float(weight if weight is not None else 1.0)
            sent = sum(len(m.buffer) for m in mine) * len(members)
            sends = [asyncio.create_task(self._send(peer, group_id, weight, mine)) for peer in members]
            deadline = loop.time() + self._diloco.averaging_timeout / 2
            await self._wait_for(lambda: set(inbox) >= members, deadline - loop.time())
            await asyncio.wait(sends, timeout=max(0.0, deadline - loop.time()))
            received = dict(inbox)
            outcome = await loop.run_in_executor(None, self._combine, tensors, me, weight, mine, received)
            outcome.update(sent=sent, received=sum(sum(len(m.buffer) for m in parts) for _, parts in received.values()),
                           missing=sorted(members - set(received)))
            self._outcome_sender.send(outcome)
        finally:
            self._inbox.pop(group_id, None)
            self._members.pop(group_id, None)

    def _combine(self, tensors: Sequence[torch.Tensor], me: str, weight: float, mine: list[runtime_pb2.Tensor],
                 received: dict[str, tuple[float, list[runtime_pb2.Tensor]]]) -> dict[str, Any]:
        """Decode every contribution (this replica's own as the others see it), aggregate, write the result into
        ``tensors``. Contributions that do not decode to the tensors' shapes are left out."""
        contributions, excluded = [], {}
        for peer, (w, parts) in sorted({**received, me: (weight, mine)}.items()):
            try:
                decoded = [deserialize_torch_tensor(part).float() for part in parts]
                if len(decoded) != len(tensors) or any(d.shape != t.shape for d, t in zip(decoded, tensors)):
                    raise ValueError("shapes differ from this stage's")
            except Exception as e:  # noqa: BLE001 - whatever a peer sent
                excluded[peer] = f"contribution cannot be read ({type(e).__name__}: {e})"
                continue
            contributions.append(Contribution(peer, w, decoded))
        result = robust_aggregate(contributions, max_weight_ratio=self._diloco.max_weight_ratio,
                                  max_norm_ratio=self._diloco.max_norm_ratio, clip_factor=self._diloco.clip_factor)
        listening = weight == 0
        if result is None or (me not in result.used and not listening):
            raise AllreduceException(f"this replica's own contribution was left out ({excluded or result})")
        for t, value in zip(tensors, result.tensors):
            t.copy_(value)
        return {"used": result.used, "excluded": {**excluded, **result.excluded}, "listening": result.listening,
                "clipped": result.clipped}

    async def _send(self, peer: str, group_id: bytes, weight: float, parts: list[runtime_pb2.Tensor]) -> None:
        async def messages() -> AsyncIterator[averaging_pb2.AveragingData]:
            for serialized in parts:
                for chunk in split_for_streaming(serialized):
                    yield averaging_pb2.AveragingData(group_id=group_id, weight=weight, tensor_part=chunk)

        stub = type(self).get_stub(self._p2p, PeerID.from_base58(peer), namespace=self.prefix)
        try:
            await stub.rpc_exchange_pseudo_gradients(messages())
        except Exception:  # noqa: BLE001 - a peer that does not take it is its own loss
            log.debug("DiLoCo %s: could not send the pseudo-gradient to …%s", self.prefix, peer[-8:], exc_info=True)

    async def rpc_exchange_pseudo_gradients(self, stream: AsyncIterator[averaging_pb2.AveragingData],
                                            context: P2PContext) -> averaging_pb2.AveragingData:
        """A group member's pseudo-gradient for a round this replica runs. Bounded: the sender must be a member of
        the group, send no more than this replica's own tensors' size (plus slack), and only once."""
        sender = context.remote_id.to_base58()
        limit = 64 * 1024 + 2 * sum(t.numel() * 4 for t in self._averaged_tensors)
        parts: list[runtime_pb2.Tensor] = []
        pending: list[runtime_pb2.Tensor] = []
        group_id, weight, size = None, 0.0, 0
        try:
            async for message in stream:
                if group_id is None:
                    group_id, weight = message.group_id, float(message.weight)
                    if not await self._await_group(group_id) or sender not in self._members.get(group_id, ()):
                        return averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
                size += message.ByteSize()  # every field: empty parts cost memory too
                if size > limit or message.group_id != group_id:
                    return averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
                if message.tensor_part.dtype and pending:
                    parts.append(combine_from_streaming(pending))
                    pending = []
                pending.append(message.tensor_part)
            if pending:
                parts.append(combine_from_streaming(pending))
        except Exception:  # noqa: BLE001 - a malformed stream is that peer's loss
            return averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
        inbox = self._inbox.get(group_id)
        if inbox is None or sender in inbox:
            return averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
        inbox[sender] = (weight, parts)
        await self._notify()
        return averaging_pb2.AveragingData(code=averaging_pb2.ACCEPTED)

    async def _await_group(self, group_id: bytes, timeout: float = 5.0) -> bool:
        """A member may send before this replica has learned about the group (its leader's answer is on the way)."""
        return await self._wait_for(lambda: group_id in self._members, timeout)


class DiLoCoSync:
    """Outer rounds for one replica of one stage (or of the whole model). ``start()`` joins the averaging group and
    loads the current outer state from a peer if one exists; ``round(samples)`` runs one round."""

    def __init__(
        self, local: Sequence[torch.Tensor], config: DiLoCoConfig, *, dht: Any, prefix: str, solo: bool = False,
        outer_optimizer_cls: Optional[type[torch.optim.Optimizer]] = None,
    ) -> None:
        """``solo``: this replica is alone by construction (a swarm nobody else was told about): rounds apply its
        own pseudo-gradient at once instead of waiting ``averaging_timeout`` for replicas that cannot come.
        ``outer_optimizer_cls``: the class of ``config.outer_optimizer``, already resolved (an expert never imports
        what a request names)."""
        self.config = config
        self.solo = solo
        self._started = False
        self.state = OuterState(local, config, outer_optimizer_cls)
        self._dht, self._prefix = dht, prefix
        self._averager: Optional[_Averager] = None
        self._presence: Optional[Presence] = None
        self._compression = pseudo_gradient_compression(config.pseudo_gradient_codec, config.codec_block_size)
        self.reports: list[RoundReport] = []
        self.listen_next_round = False
        """Set for a replica that joined its group mid-round (an expert that replaced a dead one): in its next
        round it takes the others' aggregate (weight 0) instead of adding its own few steps, so that every replica
        of the group ends the round with the same outer params."""

    def start(self, *, newer_only: bool = False) -> "DiLoCoSync":
        """Join the averaging group (unless solo) and adopt a peer's outer state if one exists (with
        ``newer_only``: only one of a later round than this replica's own, e.g. after it loaded a checkpoint)."""
        self._started = True
        if self.solo:
            return self
        self._averager = _Averager(
            lambda: self.state,
            self.config,
            compression=self._compression,
            averaged_tensors=[torch.zeros_like(o) for o in self.state.outer],
            dht=self._dht,
            prefix=self._prefix,
            start=False,
            min_group_size=2,
            target_group_size=self.config.target_group_size,
            min_matchmaking_time=self.config.matchmaking_time,
            request_timeout=min(3.0, 0.6 * self.config.matchmaking_time),  # hivemind: keep it under matchmaking
            allreduce_timeout=self.config.averaging_timeout,
        )
        try:
            self._averager.start_here(timeout=self.config.averaging_timeout)
            self._presence = Presence(self._dht, self._prefix, self._averager.peer_id.to_base58(),
                                      period=max(1.0, self.config.matchmaking_time),
                                      grace=self.config.averaging_timeout / 2).start()
        except BaseException:
            self.shutdown()
            raise
        self._load_from_peers(newer_only=newer_only)
        return self

    def shutdown(self) -> None:
        """Leave the averaging group (saying so in the DHT) and stop its process."""
        if self._presence is not None:
            self._presence.stop()
            self._presence = None
        if self._averager is not None:
            self._averager.stop()
            self._averager = None

    def _load_from_peers(self, *, newer_only: bool = True, min_round: int = 0) -> bool:
        """Adopt a peer's outer state: at start any peer's (so a late joiner starts where the others are), later only
        a newer one (a round this replica missed), and never one of a round below ``min_round``."""
        assert self._averager is not None
        try:
            loaded = self._averager.load_state_from_peers(timeout=self.config.averaging_timeout)
        except Exception:  # noqa: BLE001 - no peer could send its state: keep ours
            log.info("DiLoCo %s: no peer sent its outer state", self._prefix, exc_info=True)
            return False
        if not loaded:
            return False
        metadata, tensors = loaded
        try:
            peer_round = int(metadata.get("round", 0))
            if peer_round < max(self.state.round, min_round) or (newer_only and peer_round == self.state.round):
                return False
            state = tensor_to_state(tensors[0])
            self._check_peer_state(state)
            if state["round"] != peer_round:
                raise ValueError(f"its state is of round {state['round']}, its announcement says {peer_round}")
            self.state.load_state_dict(state)
        except Exception as e:  # noqa: BLE001 - whatever a peer sent: keep ours
            log.warning("DiLoCo %s: refused a peer's outer state (%s)", self._prefix, e)
            return False
        log.info("DiLoCo %s: loaded outer state of round %d from a peer", self._prefix, self.state.round)
        return True

    def _check_peer_state(self, state: Any) -> None:
        """A peer's outer state is used only if it has this replica's layout, a round in [0, 2^31), and finite outer
        params and optimizer state within ``max_state_distance`` (relative to the norm of this replica's outer
        params) of its own outer params and of zero respectively."""
        outer = state.get("outer") if isinstance(state, dict) else None
        if not isinstance(outer, list) or not all(isinstance(t, torch.Tensor) for t in outer):
            raise ValueError("not an outer state")
        peer_round = state.get("round")
        if not isinstance(peer_round, int) or isinstance(peer_round, bool) or not 0 <= peer_round < 2**31:
            raise ValueError(f"its round {peer_round!r} is not an int in [0, 2^31)")
        optimizer = state.get("optimizer")
        if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict):
            raise ValueError("its outer optimizer state is not an optimizer state dict")
        if not all(bool(torch.isfinite(t).all()) for t in outer):
            raise ValueError("its outer params are not finite")
        own = torch.cat([o.detach().reshape(-1).double() for o in self.state.outer])
        theirs = torch.cat([t.reshape(-1).double() for t in outer]) if outer else own
        if theirs.shape != own.shape:
            raise ValueError("its outer params do not match this replica's")
        scale = max(float(own.norm()), 1e-12)
        distance = float((theirs - own).norm()) / scale
        if distance > self.config.max_state_distance:
            raise ValueError(f"its outer params are {distance:.3g} (relative) away from ours, more than "
                             f"max_state_distance={self.config.max_state_distance}")
        for index, slots in optimizer["state"].items():
            if not isinstance(slots, dict):
                raise ValueError(f"its outer optimizer state for param {index!r} is not a dict")
            for name, value in slots.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    if not bool(torch.isfinite(value).all()):
                        raise ValueError(f"its outer optimizer state {name!r} is not finite")
                    if value.numel() > 1 and float(value.double().norm()) / scale > self.config.max_state_distance:
                        raise ValueError(f"its outer optimizer state {name!r} is larger than max_state_distance "
                                         "times our outer params")

    def round(self, samples: float, pace: Optional[dict[str, Any]] = None, target: Optional[int] = None
              ) -> RoundReport:
        """Average pseudo-gradients with the replicas that show up within ``averaging_timeout`` (weighted by
        ``samples`` processed since the last round), take the outer step, reset local params. ``pace`` (this
        replica's seconds per sample and whole batch) is announced to the group; the report carries the members'.

        A replica left out of every group loads the outer state of a peer that took part if there is one (so it
        rejoins in step), else (alone in the swarm) it applies its own pseudo-gradient. A deserted replica (its
        partners' heartbeats stopped for the grace time, ``presence.py``) does that at once instead of waiting
        ``averaging_timeout``. With ``listen_next_round`` it only takes the aggregate of the others this time.

        ``target``: the round this replica should reach (``TrainerRounds._target``); one whose outer state is already
        there (a replacement that caught up with a group a round ahead of its trainer's other parts) skips this
        round, so that the trainer's parts are in step again after it.
        """
        assert self._started, "DiLoCoSync.start() was not called"
        if target is not None and self.state.round >= target:  # a listener still listens in its next round
            log.info("DiLoCo %s: this replica's outer state is already at round %d (this part should reach round %d): "
                     "it skips this round", self._prefix, self.state.round, target)
            report = RoundReport(self.state.round, 0, 0, 0, skipped=True)
            self.reports.append(report)
            return report
        listening, self.listen_next_round = self.listen_next_round, False
        pseudo = self.state.pseudo_gradients()
        group, error = None, None
        deserted = self._presence is not None and self._presence.deserted()
        if deserted:
            error = f"{GONE} (their heartbeats stopped)"
        elif self._averager is not None:  # a solo replica has nobody to average with
            with self._averager.get_tensors() as tensors:
                for t, g in zip(tensors, pseudo):
                    t.copy_(g)
            try:
                control = self._averager.step(
                    weight=0.0 if listening else max(float(samples), 1e-6), timeout=self.config.averaging_timeout,
                    allow_retries=False, wait=False,
                    gather={"round": self.state.round, "digest": self.state.digest(),
                            **({"pace": pace} if pace else {})},
                )
                group, deserted = self._wait_for_group(control)
                if deserted:
                    error = f"{GONE} (they left while this one looked for a group)"
            except Exception as e:  # noqa: BLE001 - a failed round leaves this replica out; it must not stop training
                error = "".join(traceback.format_exception_only(e)).strip()
                log.warning("DiLoCo %s: the all-reduce of round %d failed; this replica takes a newer peer state if "
                            "one exists, else its own outer step alone", self._prefix, self.state.round + 1,
                            exc_info=True)
        nbytes = compressed_bytes(pseudo, self._compression)
        outcome = self._averager.last_outcome() if self._averager is not None else None
        catch_up = None
        if group and outcome is not None:
            me = self._averager.peer_id.to_base58()
            gathered = {str(peer): data for peer, data in group.items()} if isinstance(group, dict) else {}
            catch_up = catch_up_round(me, gathered, outcome["used"], listening=listening)
        if catch_up is not None and self._catch_up(catch_up):
            report = RoundReport(self.state.round, len(outcome["used"]) + len(outcome["listening"]), outcome["sent"],
                                 outcome["received"], excluded=outcome["excluded"])
        elif group and outcome is not None:
            if catch_up is not None:
                log.warning("DiLoCo %s: no replica of the group sent its outer state of round %d in time; this one "
                            "applies the group's aggregate to its own (older) outer state", self._prefix, catch_up)
            with self._averager.get_tensors() as tensors:
                averaged = [t.clone() for t in tensors]
            self.state.apply(averaged)
            if outcome["clipped"]:
                log.info("DiLoCo %s: round %d reduced %s", self._prefix, self.state.round, outcome["clipped"])
            if outcome["excluded"] or outcome["missing"]:
                log.warning("DiLoCo %s: round %d left out %s%s", self._prefix, self.state.round, outcome["excluded"],
                            f"; no contribution came from {outcome['missing']}" if outcome["missing"] else "")
            report = RoundReport(self.state.round, len(outcome["used"]) + len(outcome["listening"]), outcome["sent"],
                                 outcome["received"], excluded=outcome["excluded"])
        elif self._averager is not None and not deserted and self._load_from_peers():
            report = RoundReport(self.state.round, 0, 0, nbytes, failed=error)
        else:
            self.state.apply(pseudo)
            report = RoundReport(self.state.round, 1, 0, 0, failed=error)
        if group and isinstance(group, dict):
            report.paces = [p for data in group.values() if isinstance(data, dict)
                            and (p := parse_pace(data.get("pace"))) is not None]
        self.reports.append(report)
        return report

    def _wait_for_group(self, control: Any) -> tuple[Any, bool]:
        """The result of a round's averaging step (``control``: hivemind's ``StepControl``), checking every
        heartbeat period whether this replica is deserted: ``(group, False)``, or ``(None, True)`` once it is and the
        step, still looking for a group, could be cancelled (a step that began its all-reduce is waited for: the
        others may already use this replica's contribution). Raises what the step raised."""
        presence = self._presence
        while True:
            try:
                return control.result(timeout=presence.period if presence is not None else None), False
            except FutureTimeout:
                if control.done():  # the step itself failed with a timeout
                    raise
            if (presence is not None and presence.deserted() and not control.began_allreduce
                    and control.stage == AveragingStage.LOOKING_FOR_GROUP and control.cancel()):
                log.warning("DiLoCo %s: every other replica of the group is gone; round %d goes on alone",
                            self._prefix, self.state.round + 1)
                return None, True

    def _catch_up(self, target: int) -> bool:
        """Adopt the outer state of round ``target`` from a replica of the group (which takes a moment to apply the
        round it just ran); polls until ``averaging_timeout``."""
        log.info("DiLoCo %s: this replica's outer state (round %d) is not its group's; it adopts the group's round "
                 "%d from a peer", self._prefix, self.state.round, target)
        deadline = time.monotonic() + self.config.averaging_timeout
        while True:
            if self._load_from_peers(min_round=target):
                return True
            if time.monotonic() + 0.2 > deadline:
                return False
            time.sleep(0.2)


def catch_up_round(me: str, gathered: dict[str, Any], used: Sequence[str], *, listening: bool) -> Optional[int]:
    """The round whose outer state this replica must adopt instead of applying its group's aggregate, or None.

    ``gathered``: what each member announced for the round (``{"round": int, "digest": bytes}``; anything else is
    ignored), ``used``: the members whose pseudo-gradients went into the aggregate. A replica behind the newest
    contributor's round would apply the aggregate to an outdated outer state, and a listener (a replacement in its
    first round) whose outer state matches no contributor's of that round would too: both adopt round + 1 from a
    peer. A member that claims a higher round than it holds only costs the others a wait of ``averaging_timeout``.
    """
    def announced(peer: str) -> Optional[tuple[int, bytes]]:
        data = gathered.get(peer)
        if not isinstance(data, dict):
            return None
        round_, digest = data.get("round"), data.get("digest")
        if type(round_) is not int or not 0 <= round_ < 2**31 or not isinstance(digest, bytes):
            return None
        return round_, digest

    mine = announced(me)
    others = [a for a in map(announced, (p for p in used if p != me)) if a is not None]
    if mine is None or not others:
        return None
    newest = max(round_ for round_, _ in others)
    if mine[0] < newest or (listening and mine[0] == newest and mine not in others):
        return newest + 1
    return None
