"""One replica's DiLoCo rounds over hivemind decentralized averaging: one averaging group per experiment and stage;
replicas that do not show up in time are left out; a replica that misses a round or joins late loads the current
outer state from a peer."""

from __future__ import annotations

import logging
import os
import signal
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from lightning_distqat import _hivemind  # noqa: F401  (imports hivemind quietly, before the lines below do)
from hivemind.averaging import DecentralizedAverager

from lightning_distqat._process import die_with_parent, exit_with_parent
from lightning_distqat.diloco.compression import compressed_bytes, pseudo_gradient_compression
from lightning_distqat.diloco.config import DiLoCoConfig
from lightning_distqat.diloco.outer import OuterState
from lightning_distqat.swarm.messages import state_to_tensor, tensor_to_state

__all__ = ["DiLoCoSync", "RoundReport"]

log = logging.getLogger(__name__)


@dataclass
class RoundReport:
    """What one outer round did."""

    round: int
    group_size: int
    """Replicas whose pseudo-gradients were averaged (1: this replica alone)."""
    bytes_sent: int
    bytes_received: int
    failed: Optional[str] = None
    """Why the all-reduce failed, when it did (the replica then loaded a peer's newer state or stepped alone)."""


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
        self._compression = pseudo_gradient_compression(config.pseudo_gradient_codec, config.codec_block_size)
        self.reports: list[RoundReport] = []

    def start(self) -> "DiLoCoSync":
        """Join the averaging group (unless solo) and adopt a peer's outer state if one exists."""
        self._started = True
        if self.solo:
            return self
        self._averager = _Averager(
            lambda: self.state,
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
        except BaseException:
            self.shutdown()
            raise
        self._load_from_peers(newer_only=False)
        return self

    def shutdown(self) -> None:
        """Leave the averaging group and stop its process."""
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

    def round(self, samples: float) -> RoundReport:
        """Average pseudo-gradients with the replicas that show up within ``averaging_timeout`` (weighted by
        ``samples`` processed since the last round), take the outer step, reset local params.

        A replica left out of every group loads the outer state of a peer that took part if there is one (so it
        rejoins in step), else (alone in the swarm) it applies its own pseudo-gradient.
        """
        assert self._started, "DiLoCoSync.start() was not called"
        pseudo = self.state.pseudo_gradients()
        group, error = None, None
        if self._averager is not None:  # a solo replica has nobody to average with
            with self._averager.get_tensors() as tensors:
                for t, g in zip(tensors, pseudo):
                    t.copy_(g)
            try:
                group = self._averager.step(
                    weight=max(float(samples), 1e-6), timeout=self.config.averaging_timeout, allow_retries=False
                )
            except Exception as e:  # noqa: BLE001 - a failed round leaves this replica out; it must not stop training
                error = "".join(traceback.format_exception_only(e)).strip()
                log.warning("DiLoCo %s: the all-reduce of round %d failed; this replica takes a newer peer state if "
                            "one exists, else its own outer step alone", self._prefix, self.state.round + 1,
                            exc_info=True)
        nbytes = compressed_bytes(pseudo, self._compression)
        if group:
            with self._averager.get_tensors() as tensors:
                averaged = [t.clone() for t in tensors]
            self.state.apply(averaged)
            size = len(group)
            moved = int(2 * nbytes * (size - 1) / size)  # butterfly all-reduce: scatter parts, gather averages
            report = RoundReport(self.state.round, size, moved, moved)
        elif self._averager is not None and self._load_from_peers():
            report = RoundReport(self.state.round, 0, 0, nbytes, failed=error)
        else:
            self.state.apply(pseudo)
            report = RoundReport(self.state.round, 1, 0, 0, failed=error)
        self.reports.append(report)
        return report
