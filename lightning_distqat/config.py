"""Small keyword-only config dataclasses, one per component.

They hold plain values only (no modules, no DHT handles), so Hydra can build them from YAML and they can be sent to
child processes as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["SwarmConfig", "ExpertConfig"]


@dataclass(kw_only=True)
class SwarmConfig:
    """How a trainer finds and talks to the swarm."""

    experiment: str = "distqat"
    """Prefix of every DHT key: trainers and experts of one experiment must share it."""

    initial_peers: Optional[list[str]] = None
    """Multiaddrs of a running swarm (``logs/<experiment>/initial_peers.txt``). ``None`` starts an embedded swarm."""

    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    """Where this node's libp2p host listens. Loopback by default; use ``/ip4/0.0.0.0/tcp/<port>`` to be reachable."""

    request_timeout: float = 60.0
    """Seconds one forward/backward/step call to an expert may take. When it fires the trainer raises
    :class:`~lightning_distqat.swarm.remote.ExpertUnavailableError`; raise it for slow links or very large stages."""

    discovery_timeout: float = 60.0
    """Seconds to wait for a free expert with a matching fingerprint for every stage before failing."""

    lease_ttl: float = 30.0
    """Seconds a trainer's claim on an expert lasts without renewal; a trainer that dies frees its experts after this."""

    startup_timeout: float = 120.0
    """Seconds the embedded swarm may take to start all its expert processes."""

    expert_device: str = "cpu"
    """Device of the experts that the embedded swarm starts (``"cpu"`` or ``"cuda:0"``...)."""


@dataclass(kw_only=True)
class ExpertConfig:
    """One expert process: the stage it hosts and how it announces itself."""

    experiment: str = "distqat"
    """Prefix of every DHT key (must match the trainers')."""

    stage: str = "stage"
    """Name of the hosted stage: the dotted submodule path inside the user's LightningModule."""

    initial_peers: list[str] = field(default_factory=list)
    """Multiaddrs of any peer of the swarm to join. Empty starts a new swarm."""

    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    """Where the expert's libp2p host listens."""

    device: str = "cpu"
    """Torch device for the stage's module."""

    heartbeat_period: float = 5.0
    """Seconds between DHT announcements."""

    record_ttl: float = 15.0
    """Seconds a DHT announcement stays valid: a dead expert disappears from the directory after this."""

    max_pending_backward: int = 64
    """Forward contexts kept for backward; older ones are dropped (their backward then fails with a clear error)."""
