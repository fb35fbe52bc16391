"""Small keyword-only config dataclasses, one per component.

They hold plain values only (no modules, no DHT handles), so Hydra can build them from YAML and they can be sent to
child processes as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["SwarmConfig", "ExpertConfig", "DataConfig"]


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


@dataclass(kw_only=True)
class DataConfig:
    """The shared-memory data server: what it loads, how it orders and transforms it, and where it listens."""

    source: str = "sklearn-digits"
    """A Hugging Face dataset name (``"user/name"``, needs the network) or a local path: a folder written by
    ``Dataset.save_to_disk``, an image folder (one subfolder per class), or a .parquet/.arrow/.json/.jsonl/.csv/.txt
    file or a folder of them. ``"sklearn-digits"`` is scikit-learn's bundled handwritten digits (works offline)."""

    subset: Optional[str] = None
    """Configuration name of a hub dataset (the second argument of ``datasets.load_dataset``)."""

    split: str = "train"
    """Split to train on."""

    val_split: Optional[str] = None
    """Split served for validation (whole, in order, to every trainer). ``None``: see ``val_fraction``."""

    val_fraction: float = 0.0
    """When ``val_split`` is None and this is > 0, this share of ``split`` is held out (seeded) for validation."""

    task: str = "image_classification"
    """How rows become batches: ``image_classification``, ``causal_lm`` or ``speech``."""

    image_column: str = "image"
    label_column: str = "label"
    text_column: str = "text"
    audio_column: str = "audio"

    image_size: int = 32
    """Images are resized to ``image_size`` x ``image_size``."""

    channels: int = 3
    """Images are converted to 3 (RGB) or 1 (grayscale) channels."""

    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    """Per-channel normalisation (one value applies to every channel)."""

    tokenizer: str = "bytes"
    """``"bytes"`` (UTF-8 bytes, vocabulary 257 with padding id 256) or a ``transformers`` tokenizer name or path."""

    seq_len: int = 128
    """Causal LM: token sequences are truncated and padded to this length."""

    sampling_rate: int = 16000
    """Speech: expected sampling rate of the audio column (other rates are an error)."""

    max_audio_seconds: float = 10.0
    """Speech: longer clips are cut to this length."""

    batch_size: int = 32
    """Samples per batch handed to one trainer."""

    drop_last: bool = False
    """Drop the last, smaller batch of each epoch (then those samples are skipped that epoch)."""

    seed: int = 0
    """Seed of the per-epoch order: the same seed gives every trainer the same batches in the same order."""

    shuffle_buffer: int = 10_000
    """Size of the shuffle buffer: a sample moves at most this many places earlier than its position on disk.
    0 keeps the stored order."""

    num_trainers: int = 1
    """Trainers sharing one epoch: batch ``j`` goes to trainer ``j % num_trainers``, each exactly once."""

    prefetch: int = 4
    """Batches prepared ahead for each trainer."""

    address: Optional[str] = None
    """Unix socket the server listens on. ``None``: ``<tmpdir>/distqat-data-<name>.sock``."""

    name: str = "default"
    """Name of the server on this machine (part of the default address)."""

    startup_timeout: float = 300.0
    """Seconds an embedded server may take to load the dataset and start listening."""

    request_timeout: float = 120.0
    """Seconds a trainer waits for one batch before it raises :class:`DataServerError`; raise it for slow
    transforms or very large batches."""
