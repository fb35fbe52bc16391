"""DiLoCo (Douillard et al., 2023): replicas take H inner steps apart, then average their pseudo-gradients
(outer params - local params) and take one outer step together.

:class:`OuterState` is the math (no network, unit-tested against a plain reference). :class:`DiLoCoSync` runs a
round over hivemind decentralized averaging: one averaging group per experiment and stage; replicas that do not show
up in time are left out; a replica that misses a round or joins late loads the current outer state from a peer.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from hivemind.averaging import DecentralizedAverager

from lightning_distqat.swarm.dht import die_with_parent, exit_with_parent
from lightning_distqat.swarm.messages import state_to_tensor, tensor_to_state

__all__ = ["DiLoCoConfig", "OuterState", "DiLoCoSync", "RoundReport"]

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class DiLoCoConfig:
    """DiLoCo settings, shared by every replica of an experiment."""

    inner_steps: int = 50
    """H: inner optimizer steps between two outer rounds."""

    outer_lr: float = 0.7
    """Learning rate of the outer optimizer."""

    outer_momentum: float = 0.9
    """Momentum of the default outer optimizer (SGD)."""

    nesterov: bool = True
    """Nesterov momentum for the default outer optimizer."""

    outer_optimizer: Optional[str] = None
    """Class path of another outer optimizer (e.g. ``"torch.optim.Adam"``); ``None`` uses SGD with the settings above."""

    outer_optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the outer optimizer (``lr`` is always ``outer_lr``)."""

    averaging_timeout: float = 60.0
    """Seconds a round may take, matchmaking included. Replicas not in the group by then are left out of that round;
    raise it for slow links or large stages."""

    matchmaking_time: float = 3.0
    """Seconds a replica waits for others to join its averaging group before the round starts."""

    target_group_size: Optional[int] = None
    """Largest averaging group (``None``: everyone who shows up)."""

    pseudo_gradient_codec: str = "none"
    """Codec of pseudo-gradients in the all-reduce: ``none``, ``fp16``, ``int8`` or ``int4`` (set from
    ``QuantConfig.pseudo_gradients`` by the strategy). Received parts are accumulated in fp32."""

    codec_block_size: int = 256
    """Values per scale of the ``int8``/``int4`` pseudo-gradient codecs."""

    def __post_init__(self) -> None:
        if self.inner_steps < 1:
            raise ValueError(f"DiLoCoConfig: inner_steps must be >= 1, got {self.inner_steps}")
        if self.pseudo_gradient_codec not in ("none", "fp16", "int8", "int4"):
            raise ValueError(f"DiLoCoConfig: pseudo_gradient_codec {self.pseudo_gradient_codec!r} is unknown; "
                             f"expected none, fp16, int8 or int4")
        if self.averaging_timeout <= self.matchmaking_time:
            raise ValueError(
                f"DiLoCoConfig: averaging_timeout ({self.averaging_timeout}s) must exceed matchmaking_time "
                f"({self.matchmaking_time}s)"
            )


def _outer_optimizer(params: list[torch.nn.Parameter], config: DiLoCoConfig) -> torch.optim.Optimizer:
    if config.outer_optimizer is None:
        return torch.optim.SGD(
            params, lr=config.outer_lr, momentum=config.outer_momentum,
            nesterov=config.nesterov and config.outer_momentum > 0,
        )
    module_name, _, cls_name = config.outer_optimizer.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"DiLoCoConfig: outer_optimizer {config.outer_optimizer!r} is not a torch optimizer class")
    return cls(params, **{**config.outer_optimizer_kwargs, "lr": config.outer_lr})


class OuterState:
    """Outer params (CPU) and the outer optimizer for a list of live local params."""

    def __init__(self, local: Sequence[torch.Tensor], config: DiLoCoConfig) -> None:
        self.local = list(local)
        self.outer = [torch.nn.Parameter(p.detach().to("cpu", copy=True)) for p in self.local]
        self.optimizer = _outer_optimizer(self.outer, config)
        self.round = 0

    def pseudo_gradients(self) -> list[torch.Tensor]:
        """outer - local, on CPU."""
        return [o.detach() - p.detach().cpu() for o, p in zip(self.outer, self.local)]

    @torch.no_grad()
    def apply(self, averaged: Sequence[torch.Tensor]) -> None:
        """One outer step with the averaged pseudo-gradients; local params are reset to the new outer params."""
        for o, g in zip(self.outer, averaged):
            o.grad = g.to(o.dtype).clone()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.copy_to_local()
        self.round += 1

    @torch.no_grad()
    def copy_to_local(self) -> None:
        for p, o in zip(self.local, self.outer):
            p.copy_(o.to(p.device, p.dtype))

    def checksum(self) -> float:
        """A float64 sum over the outer params: replicas that agree have (nearly) equal checksums."""
        return float(sum(o.detach().double().sum() for o in self.outer))

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "outer": [o.detach().clone() for o in self.outer],
                "optimizer": self.optimizer.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Adopt another replica's outer state (params, optimizer, round) and reset local params to it."""
        if len(state["outer"]) != len(self.outer) or any(
            a.shape != b.shape for a, b in zip(state["outer"], self.outer)
        ):
            raise ValueError("DiLoCo: the peer's outer state does not match this replica's parameters")
        for o, saved in zip(self.outer, state["outer"]):
            o.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.round = int(state["round"])
        self.copy_to_local()


@dataclass
class RoundReport:
    """What one outer round did."""

    round: int
    group_size: int
    """Replicas whose pseudo-gradients were averaged (1: this replica alone)."""
    bytes_sent: int
    bytes_received: int
    loaded_from_peer: bool = False


class _Averager(DecentralizedAverager):
    """hivemind's averager for pseudo-gradients; shares the outer state with late joiners; never outlives its host."""

    def __init__(self, state_fn: Callable[[], OuterState], *args: Any, **kwargs: Any) -> None:
        self._state_fn = state_fn
        self._host_pid = os.getpid()
        super().__init__(*args, **kwargs)

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


class DiLoCoSync:
    """Outer rounds for one replica of one stage (or of the whole model). ``start()`` joins the averaging group and
    loads the current outer state from a peer if one exists; ``round(samples)`` runs one round."""

    def __init__(
        self, local: Sequence[torch.Tensor], config: DiLoCoConfig, *, dht: Any, prefix: str, solo: bool = False
    ) -> None:
        """``solo``: this replica is alone by construction (a swarm nobody else was told about): rounds apply its
        own pseudo-gradient at once instead of waiting ``averaging_timeout`` for replicas that cannot come."""
        self.config = config
        self.solo = solo
        self._started = False
        self.state = OuterState(local, config)
        self._dht, self._prefix = dht, prefix
        self._averager: Optional[_Averager] = None
        self._compression: Optional[Any] = None
        self.reports: list[RoundReport] = []

    def start(self) -> "DiLoCoSync":
        self._started = True
        if self.solo:
            return self
        from lightning_distqat.quant.averaging import pseudo_gradient_compression

        compression = self._compression = pseudo_gradient_compression(self.config.pseudo_gradient_codec,
                                                                       self.config.codec_block_size)
        self._averager = _Averager(
            lambda: self.state,
            compression=compression,
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
        except BaseException:
            self.shutdown()
            raise
        self._load_from_peers(newer_only=False)
        return self

    def shutdown(self) -> None:
        if self._averager is not None:
            self._averager.stop()
            self._averager = None

    def _load_from_peers(self, *, newer_only: bool = True) -> bool:
        """Adopt a peer's outer state: at start any peer's (so a late joiner starts where the others are), later only
        a newer one (a round this replica missed)."""
        assert self._averager is not None
        try:
            loaded = self._averager.load_state_from_peers(timeout=self.config.averaging_timeout)
        except Exception:  # noqa: BLE001 - no peer could send its state: keep ours
            log.info("DiLoCo %s: no peer sent its outer state", self._prefix, exc_info=True)
            return False
        if not loaded:
            return False
        metadata, tensors = loaded
        peer_round = int(metadata.get("round", 0))
        if peer_round < self.state.round or (newer_only and peer_round == self.state.round):
            return False
        self.state.load_state_dict(tensor_to_state(tensors[0]))
        log.info("DiLoCo %s: loaded outer state of round %d from a peer", self._prefix, self.state.round)
        return True

    def _compression_ratio(self, tensor: torch.Tensor) -> float:
        if self._compression is None:
            return 1.0
        from hivemind.compression import CompressionInfo

        return float(self._compression.estimate_compression_ratio(CompressionInfo.from_tensor(tensor)))

    def round(self, samples: float) -> RoundReport:
        """Average pseudo-gradients with the replicas that show up within ``averaging_timeout`` (weighted by
        ``samples`` processed since the last round), take the outer step, reset local params.

        A replica left out of every group loads the outer state of a peer that took part if there is one (so it
        rejoins in step), else (alone in the swarm) it applies its own pseudo-gradient.
        """
        assert self._started, "DiLoCoSync.start() was not called"
        pseudo = self.state.pseudo_gradients()
        group = None
        if self._averager is not None:  # a solo replica has nobody to average with
            with self._averager.get_tensors() as tensors:
                for t, g in zip(tensors, pseudo):
                    t.copy_(g)
            try:
                group = self._averager.step(
                    weight=max(float(samples), 1e-6), timeout=self.config.averaging_timeout, allow_retries=False
                )
            except Exception as e:  # noqa: BLE001 - a failed round leaves this replica out; it must not stop training
                log.warning("DiLoCo %s: round %d failed (%s)", self._prefix, self.state.round, e)
        nbytes = sum(int(g.numel() * g.element_size() * self._compression_ratio(g)) for g in pseudo)
        if group:
            with self._averager.get_tensors() as tensors:
                averaged = [t.clone() for t in tensors]
            self.state.apply(averaged)
            size = len(group)
            moved = int(2 * nbytes * (size - 1) / size)  # butterfly all-reduce: scatter parts, gather averages
            report = RoundReport(self.state.round, size, moved, moved)
        elif self._averager is not None and self._load_from_peers():
            report = RoundReport(self.state.round, 0, 0, nbytes, loaded_from_peer=True)
        else:
            self.state.apply(pseudo)
            report = RoundReport(self.state.round, 1, 0, 0)
        self.reports.append(report)
        return report
