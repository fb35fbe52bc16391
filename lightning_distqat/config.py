"""Small keyword-only config dataclasses, one per component.

They hold plain values only (no modules, no DHT handles), so Hydra can build them from YAML and they can be sent to
child processes as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

__all__ = ["SwarmConfig", "ExpertConfig", "MirrorConfig", "MonitorConfig", "ClientConfig", "DataConfig", "QuantConfig", "WIRE_CODECS", "PSEUDO_GRADIENT_CODECS",
           "QAT_SCHEMES", "peers_from"]

def peers_from(value: Any, component: str) -> Optional[list[str]]:
    """``initial_peers`` as a list of multiaddrs: a list of them, or ``"@path"`` (or a list holding ``"@path"``
    items): a file with one multiaddr per line, as ``distqat-monitor`` writes ``logs/<experiment>/initial_peers.txt``.
    None stays None."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    peers: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{component}: initial_peers must hold multiaddr strings or '@<file>', got {item!r}")
        if item.startswith("@"):
            try:
                with open(item[1:]) as f:
                    found = [line.strip() for line in f if line.strip() and not line.startswith("#")]
            except OSError as e:
                raise ValueError(f"{component}: initial_peers file {item[1:]!r} cannot be read ({e.strerror}); "
                                 "distqat-monitor writes logs/<experiment>/initial_peers.txt") from None
            if not found:
                raise ValueError(f"{component}: initial_peers file {item[1:]!r} lists no multiaddr")
            peers += found
        elif item.strip():
            peers.append(item.strip())
    return peers


WIRE_CODECS = ("none", "fp16", "bf16", "int8", "int4")
"""Codecs of stage inputs, outputs and gradients on the wire (``quant/codecs.py``)."""
PSEUDO_GRADIENT_CODECS = ("none", "fp16", "int8", "int4")
"""Codecs of DiLoCo pseudo-gradients in the averaging all-reduce."""
QAT_SCHEMES = ("int8-int4", "int4-weight")
"""torchao QAT schemes (``quant/qat.py``)."""


@dataclass(kw_only=True)
class SwarmConfig:
    """How a trainer finds and talks to the swarm."""

    experiment: str = "distqat"
    """Prefix of every DHT key: trainers and experts of one experiment must share it."""

    initial_peers: Optional[list[str]] = None
    """Multiaddrs of any peer of a running swarm (an expert logs its own at start). ``None`` starts an embedded
    swarm."""

    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    """Where this node's libp2p host listens. Loopback by default; use ``/ip4/0.0.0.0/tcp/<port>`` to be reachable."""

    announce_maddrs: list[str] = field(default_factory=list)
    """What this trainer tells other peers to dial (``/ip4/<public ip>/tcp/<port>`` behind port forwarding, or a link
    emulator's port, ``netem.py``); empty: the addresses it listens on. Needs an explicit port in ``host_maddrs``."""

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

    seed_experts: bool = True
    """With ``initial_peers``: send the trainer's stage weights to the experts it claims. ``False`` keeps the
    experts' own (e.g. a swarm restarted from a parameter mirror's checkpoint, which its experts warm-started from)."""

    spare_experts: int = 0
    """Unleased experts per stage that the embedded swarm starts besides the ones its trainers use: replacements
    ready when an expert dies (failover on one machine)."""

    failover_timeout: float = 60.0
    """Seconds a trainer waits for a replacement when the expert of a stage dies, stops answering or leaves; then
    :class:`~lightning_distqat.swarm.client.PipelineUnavailableError` names the stage."""

    mirror_every: int = 10
    """Optimizer steps between two snapshots of every stage's state (module and optimizer state, pulled off the
    training thread): a replacement expert starts from the newest one, so a stage whose expert dies loses at most
    this many steps (none with 1, at the cost of pulling every stage's state every step). 0: a snapshot at the start
    of training only."""

    access_token: Optional[str] = field(default=None, repr=False)
    """The experiment's shared secret: only peers that hold it can use its DHT and call its experts. ``None`` reads
    ``DISTQAT_ACCESS_TOKEN`` from the environment; unset there too, the experiment is open to anyone who finds it."""

    trainer_name: Optional[str] = None
    """This trainer's name in the fleet telemetry (``distqat-client`` names its trainers ``trainer-<k>``); None: its
    peer id."""

    shared_memory: bool = True
    """Tensors to and from experts on this host (same boot, same user) go through shared-memory slots instead of the
    P2P stream (``swarm/sharedwire.py``); experts elsewhere get bytes. Results are the same either way."""

    sessions: bool = True
    """Each expert's forward, backward, step, grad_norm, get_state and set_state calls travel on one long-lived P2P
    stream (``swarm/session.py``) instead of a new stream per call (about 0.9 ms less per call on loopback).
    Results are the same either way; False is for experts that predate sessions."""

    telemetry_period: float = 2.0
    """Seconds between two publications of this trainer's numbers under ``<experiment>_metrics`` in the DHT (loss,
    samples/s, round, wire bytes; ``distqat-monitor`` reads them). 0 publishes none."""

    def __post_init__(self) -> None:
        self.access_token = _token(self.access_token)
        self.initial_peers = peers_from(self.initial_peers, "SwarmConfig")
        for name in ("host_maddrs", "announce_maddrs"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(isinstance(m, str) and m.startswith("/") for m in value):
                raise ValueError(f"SwarmConfig: {name} must be a list of multiaddrs such as '/ip4/127.0.0.1/tcp/0', "
                                 f"got {value!r}")
        if any(m.rstrip("/").endswith("/tcp/0") for m in self.announce_maddrs):
            raise ValueError(f"SwarmConfig: announce_maddrs need an explicit port (others dial it), got "
                             f"{self.announce_maddrs!r}")
        if not isinstance(self.telemetry_period, (int, float)) or not 0 <= self.telemetry_period < float("inf"):
            raise ValueError(f"SwarmConfig: telemetry_period must be a number of seconds >= 0, got "
                             f"{self.telemetry_period!r}")
        for name in ("spare_experts", "mirror_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"SwarmConfig: {name} must be an int >= 0, got {value!r}")
        if not isinstance(self.failover_timeout, (int, float)) or not 0 <= self.failover_timeout < float("inf"):
            raise ValueError(f"SwarmConfig: failover_timeout must be a number of seconds >= 0, got "
                             f"{self.failover_timeout!r}")


@dataclass(kw_only=True)
class ExpertConfig:
    """One expert process: the stage it hosts and how it announces itself."""

    experiment: str = "distqat"
    """Prefix of every DHT key (must match the trainers')."""

    stage: str = "stage"
    """Name of the hosted stage: the dotted submodule path inside the user's LightningModule. ``"auto"`` (with a
    whole model, ``distqat-expert``): the stage of ``stages`` that has the fewest live experts."""

    stages: list[str] = field(default_factory=list)
    """The model's stages, for ``stage="auto"`` and for moving: empty takes the model's ``STAGES``."""

    rebalance: bool = True
    """With a whole model: move to a stage that has no expert, or at least two fewer than the fullest one, when this
    unleased expert is the one chosen to fill the gap (exactly one expert moves per gap)."""

    rebalance_patience: int = 3
    """Heartbeats a gap must last before an expert moves to fill it."""

    min_stay: float = 60.0
    """Seconds an expert that moved stays on its new stage before it may move again."""

    initial_peers: list[str] = field(default_factory=list)
    """Multiaddrs of any peer of the swarm to join. Empty starts a new swarm."""

    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    """Where the expert's libp2p host listens."""

    announce_maddrs: list[str] = field(default_factory=list)
    """What the expert tells others to dial (``/ip4/<public ip>/tcp/<port>``, behind NAT or port forwarding); empty:
    the addresses it listens on. ``distqat-expert public_ip=...`` builds both."""

    device: str = "cpu"
    """Torch device for the stage's module."""

    heartbeat_period: float = 5.0
    """Seconds between DHT announcements."""

    record_ttl: float = 15.0
    """Seconds a DHT announcement stays valid: a dead expert disappears from the directory after this."""

    max_pending_backward: int = 64
    """Forward contexts kept for backward; older ones are dropped (their backward then fails with a clear error)."""

    max_pending_bytes: int = 2**30
    """Bytes of inputs and outputs that the kept forward contexts may hold; older ones are dropped beyond it."""

    max_request_bytes: int = 2**29
    """Largest request an expert reads (bytes); a larger one is refused before it is read whole."""

    max_request_messages: int = 1024
    """Most messages one streamed request may announce."""

    max_concurrent_per_peer: int = 8
    """Requests one peer may have in flight at once; more are refused at once."""

    shared_memory: bool = True
    """Take and send tensors through shared-memory slots with trainers on this host (same boot, same user) that
    ask for it; others get bytes (``swarm/sharedwire.py``)."""

    max_lease_ttl: float = 300.0
    """Longest lease a trainer gets per claim (seconds); it renews before it runs out."""

    leave_timeout: float = 30.0
    """On SIGTERM the expert leaves gracefully: it takes no new work, answers what it has, gives its lease holder
    its state (so the trainer switches to another expert without losing a step) and exits once the holder lets go,
    or after this many seconds. A second SIGTERM, or SIGINT, stops it at once."""

    extra_optimizers: list[str] = field(default_factory=list)
    """Class paths of optimizers this expert builds besides ``torch.optim``'s (imported at start-up). A request
    never makes an expert import anything."""

    trusted_peers: list[str] = field(default_factory=list)
    """Peer ids that may name any importable optimizer class (the embedded swarm trusts its own trainer)."""

    access_token: Optional[str] = field(default=None, repr=False)
    """The experiment's shared secret (see :attr:`SwarmConfig.access_token`); ``None`` reads
    ``DISTQAT_ACCESS_TOKEN``."""

    mirror_peers: list[str] = field(default_factory=list)
    """Peer ids of parameter mirrors (``distqat-mirror`` prints its own) that may read this expert's state without
    holding its lease."""

    warm_start: bool = True
    """When the expert takes a stage (at start or after a move), load that stage's newest state from one of the
    ``mirror_peers`` that announces itself and has the stage."""

    flush_denormal: bool = True
    """Compute the stage with denormal floats flushed to zero (``torch.set_flush_denormal``). Denormals (magnitudes
    under 1.2e-38) make x86 float math many times slower, and a stage's activations and gradients get them after a
    DiLoCo outer step has grown its weights (GELU and softmax tails underflow): measured, inner steps took up to 3 x
    longer for several rounds. Flushing changes no result above that magnitude. False keeps IEEE denormals."""

    slowdown: float = 1.0
    """Test hook: every forward and backward of this expert takes this many times its compute time (it sleeps the
    rest, in proportion to the CPU time the computation used, so other processes' load does not change the factor),
    as a slower machine would. 1: off."""

    def __post_init__(self) -> None:
        self.access_token = _token(self.access_token)
        self.initial_peers = peers_from(self.initial_peers, "ExpertConfig") or []
        if not isinstance(self.slowdown, (int, float)) or isinstance(self.slowdown, bool) \
                or not 1 <= self.slowdown <= 1000:
            raise ValueError(f"ExpertConfig: slowdown must be a number in [1, 1000], got {self.slowdown!r}")


@dataclass(kw_only=True)
class MirrorConfig:
    """A parameter mirror (``distqat-mirror``): pulls every stage's state from the experts, writes checkpoints, and
    serves the newest state of a stage to experts that warm-start."""

    experiment: str = "distqat"
    initial_peers: list[str] = field(default_factory=list)
    """Any peer of the swarm."""

    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])

    identity_path: Optional[str] = None
    """A file holding the mirror's libp2p key (made if missing): its peer id stays the same across restarts, so the
    experts' ``mirror_peers`` stay valid."""

    checkpoint_dir: str = "checkpoints"
    """Where checkpoints go: ``mirror-<unix time>.pt``, written to a temporary file and renamed (atomic)."""

    refresh_every: float = 60.0
    """Seconds between two pulls (and checkpoints)."""

    keep: int = 3
    """Checkpoints kept; older ones are deleted."""

    request_timeout: float = 60.0
    access_token: Optional[str] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.access_token = _token(self.access_token)
        self.initial_peers = peers_from(self.initial_peers, "MirrorConfig") or []
        if not self.refresh_every > 0 or not isinstance(self.keep, int) or self.keep < 1:
            raise ValueError(f"MirrorConfig: refresh_every must be > 0 and keep an int >= 1, got "
                             f"{self.refresh_every!r}, {self.keep!r}")


@dataclass(kw_only=True)
class MonitorConfig:
    """``distqat-monitor``: where its DHT node listens, where it writes the peers file, what it reports where."""

    experiment: str = "distqat"
    stages: list[str] = field(default_factory=list)
    """The model's stages (a stage without experts counts as missing); empty: the stages that experts announce."""
    initial_peers: list[str] = field(default_factory=list)
    """Empty: this monitor starts the experiment's DHT (the usual case); else it joins the one they name."""
    public_ip: Optional[str] = None
    """The address other machines reach this one at: the node listens on ``port`` and announces
    ``/ip4/<public_ip>/tcp/<port>``. None: loopback only, on a free port."""
    port: int = 50000
    """TCP port of the DHT node when ``public_ip`` is set (0: a free one)."""
    peers_file: Optional[str] = None
    """Where the node's multiaddrs go, one per line. None: ``logs/<experiment>/initial_peers.txt``."""
    period: float = 5.0
    """Seconds between two reports."""
    wandb: bool = True
    """Report to Weights & Biases (``wandb`` offline when no API key is configured: the run can be synced later)."""
    wandb_project: str = "distqat"
    wandb_group: Optional[str] = None
    """Run group shared with the experiment's trainers (``logger=wandb`` in ``distqat-train``). None: the experiment."""
    wandb_mode: Optional[str] = None
    """``online``, ``offline`` or ``disabled``; None: online when an API key is configured, else offline."""
    wandb_dir: Optional[str] = None
    """Parent of the ``wandb/`` run folder. None: ``logs/<experiment>``."""
    console: bool = True
    """Print the fleet table (refreshed in place on a terminal, one block per report otherwise)."""
    duration: float = 0.0
    """Stop after this many seconds (0: until Ctrl+C)."""
    access_token: Optional[str] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.access_token = _token(self.access_token)
        self.initial_peers = peers_from(self.initial_peers, "MonitorConfig") or []
        if not isinstance(self.period, (int, float)) or not 0 < self.period < float("inf"):
            raise ValueError(f"MonitorConfig: period must be a number of seconds > 0, got {self.period!r}")
        if not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ValueError(f"MonitorConfig: port must be an int in [0, 65535], got {self.port!r}")
        if self.wandb_mode not in (None, "online", "offline", "disabled"):
            raise ValueError(f"MonitorConfig: wandb_mode must be online, offline, disabled or null, got "
                             f"{self.wandb_mode!r}")


@dataclass(kw_only=True)
class ClientConfig:
    """``distqat-client``: how many trainers this host runs, and how it restarts and stops them."""

    experiment: str = "distqat"
    initial_peers: list[str] = field(default_factory=list)
    """Any peer of the swarm, or ``@logs/<experiment>/initial_peers.txt``."""
    max_trainers: int = 1
    """Trainers this host runs at most (one per complete pipeline); they are ``trainer-0 .. trainer-<n-1>`` and
    share each epoch of the data server."""
    poll: float = 2.0
    """Seconds between two looks at the swarm."""
    restart_backoff: float = 2.0
    """Seconds before a crashed trainer starts again; doubles with every crash up to ``max_backoff``."""
    max_backoff: float = 60.0
    broken_timeout: float = 180.0
    """A trainer that makes no step for this long (its pipeline broke and stays broken) is stopped; it starts again
    when a complete pipeline is free."""
    start_grace: float = 120.0
    """Seconds a starting trainer counts as holding a pipeline before its telemetry shows its first step."""
    exit_when_done: bool = False
    """Exit once every trainer finished its training (``distqat-local``); else run until Ctrl+C."""
    access_token: Optional[str] = field(default=None, repr=False)
    """The experiment's secret (None: ``DISTQAT_ACCESS_TOKEN``); its trainers read it from the environment."""

    def __post_init__(self) -> None:
        self.access_token = _token(self.access_token)
        self.initial_peers = peers_from(self.initial_peers, "ClientConfig") or []
        if not isinstance(self.max_trainers, int) or isinstance(self.max_trainers, bool) or self.max_trainers < 1:
            raise ValueError(f"ClientConfig: max_trainers must be an int >= 1, got {self.max_trainers!r}")
        for name in ("poll", "restart_backoff", "max_backoff", "broken_timeout", "start_grace"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
                raise ValueError(f"ClientConfig: {name} must be a number of seconds > 0, got {value!r}")


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

    cache: bool = True
    """Transform each split once, at start-up, into one shared-memory copy when its rows have a fixed shape (images,
    token sequences) and it fits in ``cache_max_gib``; trainers then gather their batches from that copy. Otherwise
    (speech, or too large) batches are transformed as they are served. Transforms are deterministic either way: put
    random augmentation in the LightningModule (for example in ``on_after_batch_transfer``)."""

    cache_max_gib: float = 8.0
    """Largest transformed split (GiB) that ``cache`` keeps in shared memory."""

    prefetch: int = 4
    """Batches prepared ahead for each trainer (when the split is not cached)."""

    address: Optional[str] = None
    """Unix socket the server listens on. ``None``: ``data-<name>.sock`` in the user's private directory
    (``$XDG_RUNTIME_DIR/distqat`` or ``<tmpdir>/distqat-<uid>``, mode 0700)."""

    name: str = "default"
    """Name of the server on this machine (part of the default address)."""

    startup_timeout: float = 300.0
    """Seconds an embedded server may take to load the dataset and start listening."""

    request_timeout: float = 120.0
    """Seconds a trainer waits for one batch before it raises :class:`DataServerError`; raise it for slow
    transforms or very large batches."""


@dataclass(kw_only=True)
class QuantConfig:
    """What is quantized: tensors on the wire between trainer and experts, DiLoCo pseudo-gradients, and the stages
    themselves (torchao QAT). ``stages`` overrides any field for one stage, e.g.
    ``QuantConfig(activations="int8", stages={"head": {"activations": "none", "qat": None}})``."""

    enabled: bool = True
    """The single switch: ``False`` turns every quantization below off (wire, pseudo-gradients, QAT)."""

    activations: str = "none"
    """Codec of stage inputs and outputs on the wire: ``none``, ``fp16``, ``bf16``, ``int8`` or ``int4``."""

    gradients: str = "none"
    """Codec of gradients on the wire (both directions of backward)."""

    block_size: int = 256
    """Values per absmax scale for ``int8`` (each block sends one fp16 scale: 256 gives 0.252 x fp32 bytes)."""

    int4_block_size: int = 32
    """Values per absmax scale for ``int4``."""

    pseudo_gradients: str = "none"
    """Codec of DiLoCo pseudo-gradients in the averaging all-reduce: ``none``, ``fp16``, ``int8`` or ``int4``
    (received parts are accumulated in fp32)."""

    qat: Optional[str] = None
    """torchao QAT scheme prepared on each expert's stage: ``int8-int4`` (int8 per-token dynamic activations, int4
    grouped weights), ``int4-weight`` (int4 grouped weights only), or ``None``. It applies to the ``nn.Linear``
    layers of each stage; a stage without any (an embedding stage) is left as it is unless ``stages`` names a QAT
    scheme for it."""

    qat_group_size: int = 32
    """Weight group size of the int4 QAT schemes (the stage's linear in_features must be a multiple of it)."""

    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-stage overrides: stage path -> {field: value}."""

    def __post_init__(self) -> None:
        """Check every setting now, naming the field and what it accepts (per-stage overrides too)."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("stages", "enabled")}
        _check_quant(own, "QuantConfig")
        for stage, overrides in self.stages.items():
            unknown = set(overrides) - set(own)
            if unknown:
                raise ValueError(f"QuantConfig.stages['{stage}']: unknown field(s) {sorted(unknown)}; valid: "
                                 f"{sorted(own)}")
            _check_quant({**own, **overrides}, f"QuantConfig.stages['{stage}']")

    def for_stage(self, stage: str) -> "QuantConfig":
        """The settings that apply to ``stage`` (overrides applied; everything off when disabled)."""
        resolved = replace(self, stages={}, **self.stages.get(stage, {}))
        if not self.enabled:
            resolved = replace(resolved, activations="none", gradients="none", pseudo_gradients="none", qat=None)
        return resolved

    def wire_codec(self, which: str) -> tuple[str, int]:
        """(codec, block size) for ``which`` in ("activations", "gradients", "pseudo_gradients")."""
        codec = getattr(self, which)
        return codec, self.int4_block_size if codec == "int4" else self.block_size


def _check_quant(q: dict[str, Any], where: str) -> None:
    """Raise a ValueError naming ``where``, the field and the valid values for any bad QuantConfig setting."""
    for name, valid in (("activations", WIRE_CODECS), ("gradients", WIRE_CODECS),
                        ("pseudo_gradients", PSEUDO_GRADIENT_CODECS)):
        if q[name] not in valid:
            raise ValueError(f"{where}.{name}={q[name]!r} is not a codec; valid: {', '.join(valid)}")
    if q["qat"] is not None and q["qat"] not in QAT_SCHEMES:
        raise ValueError(f"{where}.qat={q['qat']!r} is not a QAT scheme; valid: {', '.join(QAT_SCHEMES)} or None")
    for name, low in (("block_size", 2), ("int4_block_size", 2), ("qat_group_size", 1)):
        if not isinstance(q[name], int) or q[name] < low:
            raise ValueError(f"{where}.{name}={q[name]!r} must be an int >= {low}")
    if q["int4_block_size"] % 2:
        raise ValueError(f"{where}.int4_block_size={q['int4_block_size']} must be even (two 4-bit codes share a byte)")


def _token(value: Optional[str]) -> Optional[str]:
    """An access token from a config field, else from ``DISTQAT_ACCESS_TOKEN``; None if neither is set."""
    import os

    return value or os.environ.get("DISTQAT_ACCESS_TOKEN") or None
