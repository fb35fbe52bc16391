"""DHT records: what an expert announces, how a trainer reads it, and the validators that keep strangers out of it.

Every expert of an experiment announces itself under one DHT key, ``<experiment>_experts``, in a subkey that holds its
own RSA public key (hivemind's ``[owner:...]`` marker): hivemind's ``RSASignatureValidator`` then accepts a change of
that subkey only if it is signed with the matching private key, so no peer can overwrite or hide another's record.
hivemind's ``SchemaValidator`` accepts only values of the expert-record schema under that key, and
:class:`ExpirationCap` refuses records that claim to live longer than ``MAX_RECORD_TTL``. Every node of a swarm
(trainers, experts) runs these validators, on what it is asked to store and on what it reads. Readers parse each
record once more and skip what does not parse; nothing in the DHT can make them fail.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Optional

import pydantic.v1 as pydantic
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time
from torch import nn

__all__ = ["ExpertRecord", "stage_fingerprint", "experts_key", "gone_key", "gone_peers", "mirror_key", "RecordError",
           "TrainerTelemetry", "metrics_key", "read_directory", "read_telemetry", "record_validators", "local_owner_key", "ExpirationCap", "MAX_RECORD_TTL"]

log = logging.getLogger(__name__)

MAX_RECORD_TTL = 600.0
"""Longest lifetime (seconds from now) that a node accepts for any record of ours."""


class RecordError(ValueError):
    """A DHT value that does not follow the expert-record schema (ignored by readers, never trusted)."""


def stage_fingerprint(module: nn.Module) -> str:
    """A short hash of a stage's parameter and buffer names, shapes and dtypes.

    Two modules with the same fingerprint can exchange state dicts; an expert is only used for a stage whose local
    submodule has the same fingerprint.
    """
    digest = hashlib.sha256()
    for kind, named in (("p", module.named_parameters()), ("b", module.named_buffers())):
        for name, tensor in named:
            digest.update(f"{kind}:{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    return digest.hexdigest()[:16]


def experts_key(experiment: str) -> str:
    """The DHT key under which every expert of ``experiment`` announces itself (one signed subkey per expert)."""
    return f"{experiment}_experts"


def gone_key(experiment: str) -> str:
    """The DHT key under which trainers say which experts of ``experiment`` they saw die (one signed subkey per
    trainer): experts that place themselves do not count those, even while their records have not expired."""
    return f"{experiment}_gone"


def gone_peers(value: Any) -> set[str]:
    """The peer ids of a ``gone`` directory as read from the DHT (what does not parse is skipped)."""
    peers: set[str] = set()
    for item in (value.values() if isinstance(value, dict) else []):
        listed = getattr(item, "value", None)
        if isinstance(listed, dict) and isinstance(listed.get("peers"), list):
            peers.update(p for p in listed["peers"][:MAX_GONE] if isinstance(p, str) and 0 < len(p) <= 128)
    return peers


def mirror_key(experiment: str) -> str:
    """The DHT key under which parameter mirrors of ``experiment`` announce themselves (one signed subkey each)."""
    return f"{experiment}_mirrors"


def metrics_key(experiment: str) -> str:
    """The DHT key under which trainers of ``experiment`` publish their latest telemetry (one signed subkey each)."""
    return f"{experiment}_metrics"


@dataclass(frozen=True, kw_only=True)
class TrainerTelemetry:
    """One trainer's latest numbers, as it publishes them under ``<experiment>_metrics`` (for the monitor)."""

    trainer: str
    """The trainer's name (``trainer-<k>`` under ``distqat-client``; its peer id otherwise)."""
    step: int
    """Inner steps done in this fit."""
    loss: float
    """Training loss of the latest step (NaN before the first)."""
    samples_per_s: float
    """Samples per second over the steps since the previous publication."""
    samples: int
    """Samples trained in this fit."""
    round: int
    """DiLoCo outer rounds done (0 without DiLoCo)."""
    group_size: int
    """Replicas in the latest outer round (0 before the first)."""
    wire_bytes: int
    """Tensor bytes sent to and received from the experts so far (after encoding)."""
    experts: list[str]
    """Peer ids of the experts of this trainer's pipeline, stage by stage."""

    _TYPES = {"trainer": str, "step": int, "loss": float, "samples_per_s": float, "samples": int, "round": int,
              "group_size": int, "wire_bytes": int, "experts": list}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: Any) -> "TrainerTelemetry":
        """Validate a value read from the DHT; raise :class:`RecordError` if it is not well-formed telemetry."""
        if not isinstance(value, dict) or set(value) != set(cls._TYPES):
            raise RecordError(f"telemetry must be a dict with fields {sorted(cls._TYPES)}, got {value!r:.200}")
        for name, expected in cls._TYPES.items():
            if type(value[name]) is not expected:
                raise RecordError(f"telemetry field {name!r} has bad value {value[name]!r:.100}")
        counts = ("step", "samples", "round", "group_size", "wire_bytes")
        if any(value[name] < 0 for name in counts) or not 0 < len(value["trainer"]) <= 128:
            raise RecordError(f"telemetry has a negative count or a bad trainer name: {value!r:.200}")
        if not math.isfinite(value["samples_per_s"]) or value["samples_per_s"] < 0 or math.isinf(value["loss"]):
            raise RecordError(f"telemetry has a bad rate or loss: {value!r:.200}")
        if len(value["experts"]) > 64 or not all(isinstance(p, str) and len(p) <= 128 for p in value["experts"]):
            raise RecordError("telemetry lists more than 64 experts or a bad peer id")
        return cls(**value)


def read_directory(dht: Any, key: str, parse: Any, *, with_expiration: bool = False) -> list[Any]:
    """Every value under the DHT ``key`` that ``parse`` accepts (what raises :class:`RecordError` is skipped with
    a debug line: nothing a stranger stores can make a reader fail); with ``with_expiration``, as
    ``(value, expiration_time)`` pairs."""
    found = dht.get(key, latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    parsed = []
    for item in found.value.values():
        try:
            value = parse(getattr(item, "value", None))
        except RecordError as e:
            log.debug("ignoring a malformed record under %s: %s", key, e)
            continue
        parsed.append((value, float(getattr(item, "expiration_time", 0.0))) if with_expiration else value)
    return parsed


def read_telemetry(dht: Any, experiment: str) -> list["TrainerTelemetry"]:
    """The newest telemetry of each trainer name (a restarted trainer publishes under a new key while its previous
    record has not expired yet; the later expiration is the later publication)."""
    newest: dict[str, tuple[TrainerTelemetry, float]] = {}
    for telemetry, expires in read_directory(dht, metrics_key(experiment), TrainerTelemetry.from_dict,
                                             with_expiration=True):
        if telemetry.trainer not in newest or expires > newest[telemetry.trainer][1]:
            newest[telemetry.trainer] = (telemetry, expires)
    return [t for t, _ in newest.values()]


MAX_GONE = 64
"""Most peer ids one trainer lists as gone."""


@dataclass(frozen=True, kw_only=True)
class ExpertRecord:
    """One expert's announcement in the directory."""

    peer_id: str
    stage: str
    fingerprint: str
    version: int = 0
    """Outer-step version of the stage's shared state (the DiLoCo round; 0 until DiLoCo syncs)."""
    throughput: float = 0.0
    """Samples per second measured over recent forward/backward calls."""
    leased: bool = False
    """Whether a trainer holds this expert now (which one is the expert's own business)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: Any) -> "ExpertRecord":
        """Validate a value read from the DHT; raise :class:`RecordError` if it is not a well-formed record."""
        if not isinstance(value, dict):
            raise RecordError(f"expert record must be a dict, got {type(value).__name__}")
        types = {"peer_id": str, "stage": str, "fingerprint": str, "version": int, "throughput": float, "leased": bool}
        if set(value) != set(types):
            raise RecordError(f"expert record has fields {sorted(value)}, expected {sorted(types)}")
        for name, expected in types.items():
            if type(value[name]) is not expected:
                raise RecordError(f"expert record field {name!r} has bad value {value[name]!r}")
        if value["version"] < 0 or not math.isfinite(value["throughput"]) or value["throughput"] < 0:
            raise RecordError(f"expert record has a bad version or throughput: {value}")
        if not value["peer_id"] or len(value["peer_id"]) > 128 or not value["stage"] or len(value["stage"]) > 512:
            raise RecordError(f"expert record has a bad peer id or stage: {value}")
        return cls(**value)


class _RecordModel(pydantic.BaseModel):
    """The expert-record schema as hivemind's SchemaValidator checks it (strict types: no conversions)."""

    peer_id: pydantic.constr(strict=True, min_length=1, max_length=128)  # type: ignore[valid-type]
    stage: pydantic.constr(strict=True, min_length=1, max_length=512)  # type: ignore[valid-type]
    fingerprint: pydantic.constr(strict=True, max_length=64)  # type: ignore[valid-type]
    version: pydantic.conint(strict=True, ge=0)  # type: ignore[valid-type]
    throughput: pydantic.confloat(strict=True, ge=0.0)  # type: ignore[valid-type]
    leased: pydantic.StrictBool


class _GoneModel(pydantic.BaseModel):
    peers: pydantic.conlist(pydantic.constr(strict=True, min_length=1, max_length=128),  # type: ignore[valid-type]
                            max_items=MAX_GONE)


class _MirrorModel(pydantic.BaseModel):
    peer_id: pydantic.constr(strict=True, min_length=1, max_length=128)  # type: ignore[valid-type]


class _MetricsModel(pydantic.BaseModel):
    trainer: pydantic.constr(strict=True, min_length=1, max_length=128)  # type: ignore[valid-type]
    step: pydantic.conint(strict=True, ge=0)  # type: ignore[valid-type]
    loss: pydantic.StrictFloat
    samples_per_s: pydantic.confloat(strict=True, ge=0.0)  # type: ignore[valid-type]
    samples: pydantic.conint(strict=True, ge=0)  # type: ignore[valid-type]
    round: pydantic.conint(strict=True, ge=0)  # type: ignore[valid-type]
    group_size: pydantic.conint(strict=True, ge=0)  # type: ignore[valid-type]
    wire_bytes: pydantic.conint(strict=True, ge=0)  # type: ignore[valid-type]
    experts: pydantic.conlist(pydantic.constr(strict=True, max_length=128), max_items=64)  # type: ignore[valid-type]


class _DirectorySchema(pydantic.BaseModel):
    """``<experiment>_experts``: one record per owner-marked subkey; ``<experiment>_gone``: per trainer, the experts
    it saw die; ``<experiment>_mirrors``: parameter mirrors; ``<experiment>_metrics``: per trainer, its latest
    telemetry."""

    experts: dict[BytesWithPublicKey, _RecordModel]  # type: ignore[valid-type]
    gone: dict[BytesWithPublicKey, _GoneModel]  # type: ignore[valid-type]
    mirrors: dict[BytesWithPublicKey, _MirrorModel]  # type: ignore[valid-type]
    metrics: dict[BytesWithPublicKey, _MetricsModel]  # type: ignore[valid-type]


class ExpirationCap(RecordValidatorBase):
    """Refuses records whose expiration lies more than ``MAX_RECORD_TTL`` seconds ahead (a stranger cannot make a
    record outlive its owner's heartbeat by much)."""

    def validate(self, record: DHTRecord) -> bool:
        return record.expiration_time <= get_dht_time() + MAX_RECORD_TTL

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, ExpirationCap)


class OwnerSubkeyOnly(RecordValidatorBase):
    """Under ``<experiment>_experts``, ``_gone``, ``_mirrors`` and ``_metrics``, a subkey is exactly one
    ``[owner:...]`` marker and nothing else: one record per key pair (``RSASignatureValidator`` alone would let an
    owner add any number of subkeys that contain its marker)."""

    _MARKER = re.compile(rb"\[owner:[^\]]+\]")

    def __init__(self, experiment: str) -> None:
        keys = (experts_key, gone_key, mirror_key, metrics_key)
        self._keys = {DHTID.generate(source=key(experiment)).to_bytes() for key in keys}

    def validate(self, record: DHTRecord) -> bool:
        if record.key not in self._keys:
            return True
        try:
            subkey = MSGPackSerializer.loads(record.subkey) if record.subkey is not None else None
        except Exception:  # noqa: BLE001 - whatever a stranger stored
            return False
        return isinstance(subkey, bytes) and self._MARKER.fullmatch(subkey) is not None

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, OwnerSubkeyOnly) and other._keys == self._keys


def record_validators(experiment: Optional[str]) -> list[RecordValidatorBase]:
    """The validators a DHT node of ``experiment`` runs: signatures (hivemind's process-wide RSA key signs this
    process's records), the directory schema and the expiration cap. Without an experiment (a bare bootstrap node),
    only the expiration cap."""
    if experiment is None:
        return [ExpirationCap()]
    return [ExpirationCap(), OwnerSubkeyOnly(experiment), RSASignatureValidator(),
            SchemaValidator(_DirectorySchema, prefix=experiment, allow_extra_keys=True)]


def local_owner_key() -> bytes:
    """This process's ``[owner:...]`` marker: the subkey under which it may store (and sign) its own record."""
    return RSASignatureValidator().local_public_key
