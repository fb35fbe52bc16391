"""The parameter mirror (``distqat-mirror``): every ``refresh_every`` seconds it pulls the state of every stage from
one of its experts (the one with the newest DiLoCo round), writes a checkpoint of all of them to ``checkpoint_dir``
(a temporary file renamed into place, the last ``keep`` kept), and serves the newest state of a stage to experts that
take that stage (``rpc_checkpoint``). At start it loads the newest checkpoint of its folder, so a whole swarm can be
restarted from it: experts warm-start from the mirror, and trainers that join with ``SwarmConfig.seed_experts=False``
keep those weights.

Experts let a mirror read their state without a lease only if their owner lists its peer id
(``ExpertConfig.mirror_peers``); ``identity_path`` keeps that id the same across restarts.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import threading
import time
from typing import Any, AsyncIterator, Optional

import torch
from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time

from lightning_distqat import _hivemind  # noqa: F401 - the bounded stream reader
from lightning_distqat.config import MirrorConfig, SwarmConfig
from lightning_distqat.swarm.auth import ACCESS_DENIED, AccessToken
from lightning_distqat.swarm.client import SwarmClient
from lightning_distqat.swarm.messages import collect, linger, pack, state_to_tensor, tensor_to_state, unpack
from lightning_distqat.swarm.records import local_owner_key, mirror_key
from lightning_distqat.swarm.remote import ExpertError

__all__ = ["ParameterMirror", "MirrorServicer", "fetch_from_mirrors", "latest_checkpoint"]

log = logging.getLogger(__name__)

Request = runtime_pb2.ExpertRequest
Response = runtime_pb2.ExpertResponse


def latest_checkpoint(folder: str) -> Optional[str]:
    """The newest ``mirror-*.pt`` of ``folder`` (by the time in its name), or None."""
    files = sorted(glob.glob(os.path.join(folder, "mirror-*.pt")), key=_stamp)
    return files[-1] if files else None


def _stamp(path: str) -> float:
    try:
        return float(os.path.basename(path)[len("mirror-"):-len(".pt")])
    except ValueError:
        return -1.0


class MirrorServicer(ServicerBase):
    """``rpc_checkpoint({"stage": ...})``: the mirror's newest state of that stage (streamed), or an error."""

    def __init__(self, mirror: "ParameterMirror") -> None:
        self.mirror = mirror

    async def rpc_checkpoint(self, request: Request, context: P2PContext) -> AsyncIterator[Response]:
        header, _ = unpack([request])
        caller = context.remote_id.to_base58()
        access = self.mirror.access
        if not isinstance(header, dict) or not isinstance(header.get("stage"), str):
            reply: tuple[dict, list] = ({"error": "a checkpoint request names a stage"}, [])
        elif access is not None and not access.check(header.get("proof"), caller, self.mirror.peer_id):
            reply = ({"error": ACCESS_DENIED}, [])
        else:
            entry = self.mirror.stages.get(header["stage"])
            if entry is None:
                reply = ({"error": f"the mirror has no state of stage {header['stage']!r}"}, [])
            else:
                blob = await asyncio.get_running_loop().run_in_executor(None, state_to_tensor, entry["state"])
                reply = ({"fingerprint": entry["fingerprint"], "round": entry["round"], "time": entry["time"]}, [blob])
        async for message in linger(pack(Response, *reply)):
            yield message


async def fetch_from_mirrors(p2p: Any, dht: Any, experiment: str, stage: str, fingerprint: str,
                             access_token: Optional[str] = None, timeout: float = 30.0,
                             trusted: Optional[set[str]] = None) -> Optional[tuple[dict[str, Any], dict[str, Any]]]:
    """The newest state of ``stage`` (with this ``fingerprint``) that a mirror of ``experiment`` announced in the DHT
    serves, with its header (round, time), or None. Only mirrors in ``trusted`` are asked (None: any announced one).
    Whatever does not parse or fit is skipped."""
    from hivemind.p2p import PeerID

    found = await asyncio.get_running_loop().run_in_executor(None, lambda: dht.get(mirror_key(experiment),
                                                                                    latest=True))
    peers = []
    for item in (found.value.values() if found is not None and isinstance(found.value, dict) else []):
        value = getattr(item, "value", None)
        if isinstance(value, dict) and isinstance(value.get("peer_id"), str) and (
                trusted is None or value["peer_id"] in trusted):
            peers.append(value["peer_id"])
    best = None
    for peer in peers:
        try:
            stub = MirrorServicer.get_stub(p2p, PeerID.from_base58(peer))
            header = {"stage": stage}
            if access_token is not None:
                header["proof"] = AccessToken(access_token, experiment).proof(p2p.peer_id.to_base58(), peer)
            (request,) = pack(Request, header)
            reply, tensors = unpack(await asyncio.wait_for(collect(await stub.rpc_checkpoint(request)), timeout))
            if not reply or "error" in reply or reply.get("fingerprint") != fingerprint or len(tensors) != 1:
                continue
            state = tensor_to_state(tensors[0])
            if best is None or reply.get("time", 0) > best[1].get("time", 0):
                best = (state, reply)
        except Exception:  # noqa: BLE001 - a mirror that cannot answer is skipped
            log.debug("mirror …%s could not serve stage '%s'", peer[-8:], stage, exc_info=True)
    return best


class ParameterMirror:
    """See the module docstring. ``start()`` joins the swarm and starts pulling; ``shutdown()`` stops."""

    def __init__(self, config: MirrorConfig) -> None:
        self.config = config
        self.client = SwarmClient(SwarmConfig(experiment=config.experiment, initial_peers=config.initial_peers or None,
                                              host_maddrs=config.host_maddrs, request_timeout=config.request_timeout,
                                              access_token=config.access_token))
        self.access = AccessToken(config.access_token, config.experiment) if config.access_token else None
        self.stages: dict[str, dict[str, Any]] = {}
        """The newest state per stage: ``{"state", "fingerprint", "round", "time", "peer"}``."""
        self.checkpoints: list[str] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._servicer = MirrorServicer(self)

    @property
    def peer_id(self) -> str:
        return self.client.peer_id

    def start(self) -> "ParameterMirror":
        os.makedirs(self.config.checkpoint_dir, exist_ok=True)
        newest = latest_checkpoint(self.config.checkpoint_dir)
        if newest is not None:
            saved = torch.load(newest, weights_only=True, map_location="cpu")
            self.stages = dict(saved.get("stages", {}))
            log.info("distqat-mirror: loaded %s (stages %s)", newest, sorted(self.stages))
        kwargs = {"identity_path": self.config.identity_path} if self.config.identity_path else {}
        self.client.start(**kwargs)
        try:
            self.client.runner.run(self._servicer.add_p2p_handlers(self.client.p2p), timeout=30)
            self._announce()
        except BaseException:
            self.client.shutdown()
            raise
        self._thread = threading.Thread(target=self._loop, name="distqat-mirror", daemon=True)
        self._thread.start()
        return self

    def _announce(self) -> None:
        self.client.dht.store(mirror_key(self.config.experiment), subkey=local_owner_key(),
                              value={"peer_id": self.peer_id},
                              expiration_time=get_dht_time() + max(3 * self.config.refresh_every, 60.0))

    def _loop(self) -> None:
        while not self._stop.wait(self.config.refresh_every):
            try:
                self._announce()
                if self.pull():
                    self.write_checkpoint()
            except Exception:  # noqa: BLE001 - the next refresh may work
                log.warning("distqat-mirror: a refresh failed", exc_info=True)

    def pull(self) -> int:
        """Pull every announced stage's state from one of its experts (newest DiLoCo round first); returns how many
        stages were pulled."""
        by_stage: dict[str, list] = {}
        for record in self.client.directory():
            by_stage.setdefault(record.stage, []).append(record)
        pulled = 0
        for stage, records in by_stage.items():
            for record in sorted(records, key=lambda r: (-r.version, r.peer_id)):
                try:
                    state = self.client.handle(stage, record.peer_id).get_state()
                except (ExpertError, ValueError) as e:
                    log.debug("distqat-mirror: expert …%s of '%s' gave no state (%s)", record.peer_id[-8:], stage, e)
                    continue
                self.stages[stage] = {"state": state, "fingerprint": record.fingerprint, "round": record.version,
                                      "time": time.time(), "peer": record.peer_id}
                pulled += 1
                break
        return pulled

    def write_checkpoint(self) -> str:
        """Every stage's newest state in one file (written to a temporary name, then renamed); the last ``keep``
        stay."""
        folder = self.config.checkpoint_dir
        path = os.path.join(folder, f"mirror-{time.time():.3f}.pt")
        tmp = path + ".tmp"
        torch.save({"experiment": self.config.experiment, "time": time.time(), "stages": self.stages}, tmp)
        os.replace(tmp, path)
        files = sorted(glob.glob(os.path.join(folder, "mirror-*.pt")), key=_stamp)
        for old in files[:-self.config.keep]:
            os.remove(old)
        self.checkpoints = files[-self.config.keep:]
        log.info("distqat-mirror: wrote %s (%d stages)", path, len(self.stages))
        return path

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.request_timeout + 10)
            self._thread = None
        self.client.shutdown()
