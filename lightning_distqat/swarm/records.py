"""DHT record schemas: what an expert announces and how a trainer reads it. Pure logic, no network."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Optional

from torch import nn

__all__ = ["ExpertRecord", "stage_fingerprint", "stage_key", "RecordError"]


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


def stage_key(experiment: str, stage: str) -> str:
    """The DHT key under which the experts of one stage announce themselves (one subkey per expert peer id)."""
    return f"{experiment}.stage.{stage}"


@dataclass(frozen=True, kw_only=True)
class ExpertRecord:
    """One expert's announcement in the stage directory."""

    peer_id: str
    stage: str
    fingerprint: str
    version: int = 0
    """Outer-step version of the stage's shared state (0 until DiLoCo syncs)."""
    throughput: float = 0.0
    """Samples per second measured over recent forward/backward calls."""
    lease_holder: Optional[str] = None
    """Id of the trainer that currently holds this expert, or None if it is free."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: Any) -> "ExpertRecord":
        """Validate a value read from the DHT; raise :class:`RecordError` if it is not a well-formed record."""
        if not isinstance(value, dict):
            raise RecordError(f"expert record must be a dict, got {type(value).__name__}")
        types = {"peer_id": str, "stage": str, "fingerprint": str, "version": int, "throughput": (int, float)}
        for name, expected in types.items():
            if name in ("version", "throughput") and name not in value:
                continue
            if not isinstance(value.get(name), expected):
                raise RecordError(f"expert record field {name!r} has bad value {value.get(name)!r}")
        holder = value.get("lease_holder")
        if holder is not None and not isinstance(holder, str):
            raise RecordError(f"expert record field 'lease_holder' has bad value {holder!r}")
        unknown = set(value) - set(types) - {"lease_holder"}
        if unknown:
            raise RecordError(f"expert record has unknown fields {sorted(unknown)}")
        return cls(
            peer_id=value["peer_id"],
            stage=value["stage"],
            fingerprint=value["fingerprint"],
            version=int(value.get("version", 0)),
            throughput=float(value.get("throughput", 0.0)),
            lease_holder=holder,
        )
