"""Expert lifecycle: join the DHT, serve the stage's RPCs, announce it with an expiring heartbeat, stop cleanly."""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import signal
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Optional

from hivemind.utils import get_dht_time
from torch import nn

from lightning_distqat.config import ExpertConfig
from lightning_distqat.diloco.config import group_prefix
from lightning_distqat.diloco.sync import DiLoCoSync
from lightning_distqat.expert.backend import StageBackend, warm_up
from lightning_distqat.expert.servicer import ExpertServicer
from lightning_distqat.swarm.dht import start_dht
from lightning_distqat.expert.checks import OptimizerAllowlist, plain_hparams
from lightning_distqat.expert.placement import MovePolicy, initial_stage, planned_move
from lightning_distqat.swarm.records import (ExpertRecord, RecordError, experts_key, gone_key, gone_peers,
                                             local_owner_key)

__all__ = ["ExpertServer"]

log = logging.getLogger(__name__)


class ExpertServer:
    """Hosts one stage. ``run()`` blocks until :meth:`shutdown` is called or (main thread) SIGINT/SIGTERM arrives.

    ``on_ready(info)`` is called once the expert serves requests and has announced itself; ``info`` holds its
    ``peer_id``, ``maddrs`` and ``timings`` (``time.time()`` when its DHT node had joined and when it served).
    """

    def __init__(
        self,
        config: ExpertConfig,
        module: Optional[nn.Module] = None,
        *,
        model: Optional[nn.Module] = None,
        on_ready: Optional[Callable[[dict[str, Any]], None]] = None,
    ) -> None:
        """``module``: the stage to host. ``model``: the whole model instead, for ``config.stage == "auto"`` and for
        moving to stages that lack experts (``config.rebalance``); its stages are ``config.stages`` or its
        ``STAGES``."""
        if module is None and model is None:
            raise ValueError("ExpertServer needs the stage module or the whole model")
        if config.stage == "auto" and model is None:
            raise ValueError("ExpertServer: stage='auto' needs the whole model to pick a stage from")
        self.config = config
        self.module = module
        self.model = model
        self.stages = list(config.stages or getattr(model, "STAGES", None) or []) if model is not None else []
        if model is not None and not self.stages:
            raise ValueError(f"ExpertServer: {type(model).__name__} has no STAGES; set ExpertConfig.stages")
        for stage in self.stages:
            try:
                model.get_submodule(stage)
            except AttributeError:
                raise ValueError(f"ExpertServer: stage '{stage}' is not a submodule of {type(model).__name__}") \
                    from None
        self.moves = MovePolicy(patience=config.rebalance_patience, min_stay=config.min_stay)
        self.on_ready = on_ready
        self.timings: dict[str, float] = {}
        self.servicer: Optional[ExpertServicer] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._p2p: Any = None
        self._dht: Any = None
        self._stop: Optional[asyncio.Event] = None
        self._stop_requested = threading.Event()
        self._heartbeat_stop = threading.Event()
        self._fatal: Optional[BaseException] = None

    def shutdown(self) -> None:
        """Ask a running server to stop (thread-safe). ``run()`` returns once it has."""
        self._stop_requested.set()
        if self._loop is not None and self._stop is not None:
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # the loop has closed: the server has stopped already
                pass

    def leave(self) -> None:
        """Leave gracefully (SIGTERM; on the event loop): no new work, the lease holder may still take the stage's
        state and let go; stop once it has, or after ``leave_timeout``. Called again: stop at once."""
        assert self._loop is not None and self._stop is not None
        if self.servicer is None or self.servicer.lease_holder is None or self.servicer.leaving:
            self._stop.set()
            return
        self.servicer.leaving = True
        log.info("expert for stage '%s' is leaving: it takes no new work and waits up to %.0f s for its trainer to "
                 "take its state", self.config.stage, self.config.leave_timeout)
        self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        assert self._loop is not None and self._stop is not None and self.servicer is not None
        deadline = self._loop.time() + self.config.leave_timeout
        while self.servicer.lease_holder is not None and self._loop.time() < deadline:
            await asyncio.sleep(0.1)
        if self.servicer.lease_holder is not None:
            log.warning("expert for stage '%s': its trainer did not take its state within %.0f s; leaving anyway",
                        self.config.stage, self.config.leave_timeout)
        await asyncio.sleep(0.5)  # answers on their way reach their callers
        self._stop.set()

    def _fail(self, error: BaseException) -> None:
        """A request broke the stage beyond one answer (``SystemExit`` or ``KeyboardInterrupt`` inside it): stop
        announcing and serving; ``run()`` then raises."""
        self._fatal = error
        self._heartbeat_stop.set()
        self.shutdown()

    def run(self) -> None:
        """Serve until :meth:`shutdown`, SIGINT or SIGTERM. Raises ``RuntimeError`` after a fatal error in the stage
        (the process should then exit non-zero: it no longer serves)."""
        cfg = self.config
        warm_up()
        self._allowlist = OptimizerAllowlist(cfg.extra_optimizers, cfg.trusted_peers)
        dht = start_dht(cfg.initial_peers, host_maddrs=cfg.host_maddrs, experiment=cfg.experiment,
                        access_token=cfg.access_token,
                        **({"announce_maddrs": cfg.announce_maddrs} if cfg.announce_maddrs else {}))
        self.timings["joined"] = time.time()
        heartbeat: Optional[threading.Thread] = None
        try:
            peer_id = dht.peer_id.to_base58()
            if cfg.stage == "auto":
                stage = initial_stage(self.stages, self._directory(dht), peer_id)
                log.info("expert …%s takes stage '%s' (the fewest live experts of %s)", peer_id[-8:], stage,
                         self.stages)
                cfg = self.config = replace(cfg, stage=stage)
            allowlist = self._allowlist

            def make_sync(config: Any, solo: bool, caller: Optional[str]) -> DiLoCoSync:
                outer = allowlist.resolve(config.outer_optimizer, caller) if config.outer_optimizer else None
                if outer is not None:  # its keyword arguments come from the network too
                    known = [name for name in inspect.signature(outer).parameters if name not in ("params", "lr")]
                    config = replace(config, outer_optimizer_kwargs=plain_hparams(
                        config.outer_optimizer_kwargs, known, "DiLoCoConfig.outer_optimizer_kwargs"))
                assert self.servicer is not None
                return DiLoCoSync(self.servicer.backend.trainable_params(), config, dht=dht,
                                  prefix=group_prefix(self.config.experiment, self.config.stage), solo=solo,
                                  outer_optimizer_cls=outer)

            self.servicer = ExpertServicer(self._backend(cfg.stage), peer_id, config=cfg, make_sync=make_sync,
                                           on_fatal=self._fail)
            heartbeat = threading.Thread(target=self._heartbeat, args=(dht,), name="distqat-heartbeat", daemon=True)
            asyncio.run(self._serve(dht, heartbeat))
        finally:
            self._heartbeat_stop.set()
            if heartbeat is not None and heartbeat.is_alive():
                heartbeat.join(timeout=10)
            if self.servicer is not None:
                self.servicer.shutdown()
            dht.shutdown()
            log.info("expert for stage '%s' stopped", self.config.stage)
        if self._fatal is not None:
            raise RuntimeError(f"expert for stage '{self.config.stage}' stopped: its stage raised "
                               f"{type(self._fatal).__name__}") from self._fatal

    async def _serve(self, dht: Any, heartbeat: threading.Thread) -> None:
        assert self.servicer is not None
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        if self._stop_requested.is_set():
            return
        if threading.current_thread() is threading.main_thread():
            self._loop.add_signal_handler(signal.SIGINT, self._stop.set)
            self._loop.add_signal_handler(signal.SIGTERM, self.leave)
        p2p = await dht.replicate_p2p()
        self._p2p, self._dht = p2p, dht
        await self.servicer.add_p2p_handlers(p2p)
        try:
            await self._warm_start()
            self._announce(dht)
            heartbeat.start()
            maddrs = [str(m) for m in dht.get_visible_maddrs()]
            log.info(
                "expert ready: stage '%s' (fingerprint %s) as peer %s on %s",
                self.config.stage, self.servicer.backend.fingerprint, self.servicer.peer_id, ", ".join(maddrs),
            )
            self.timings["serving"] = time.time()
            if self.on_ready is not None:
                self.on_ready({"peer_id": self.servicer.peer_id, "maddrs": maddrs, "timings": dict(self.timings)})
            await self._stop.wait()
        finally:
            await self.servicer.remove_p2p_handlers(p2p)
            await p2p.shutdown()

    def _record(self) -> ExpertRecord:
        assert self.servicer is not None
        return ExpertRecord(
            peer_id=self.servicer.peer_id,
            stage=self.config.stage,
            fingerprint=self.servicer.backend.fingerprint,
            version=self.servicer.diloco.state.round if self.servicer.diloco is not None else 0,
            throughput=float(self.servicer.backend.throughput),
            leased=self.servicer.lease_holder is not None or self.servicer.leaving,  # nobody claims a leaver
        )

    def _announce(self, dht: Any) -> None:
        """Store this expert's record (signed, in its own subkey) with an expiration of ``record_ttl``."""
        record = self._record()
        ok = dht.store(
            experts_key(self.config.experiment),
            subkey=local_owner_key(),
            value=record.to_dict(),
            expiration_time=get_dht_time() + self.config.record_ttl,
        )
        if not ok:
            log.warning("expert for stage '%s' could not store its DHT record (no DHT peers reachable?)", record.stage)

    def _backend(self, stage: str) -> StageBackend:
        cfg = self.config
        module = self.module if self.model is None else self.model.get_submodule(stage)
        return StageBackend(stage, module, device=cfg.device, max_pending=cfg.max_pending_backward,
                            max_pending_bytes=cfg.max_pending_bytes, allowlist=self._allowlist)

    def _directory(self, dht: Any) -> list[ExpertRecord]:
        """The live experts of the experiment: their records, less those a trainer saw die (their records may not
        have expired yet)."""
        found = dht.get(experts_key(self.config.experiment), latest=True)
        gone = dht.get(gone_key(self.config.experiment), latest=True)
        dead = gone_peers(gone.value) if gone is not None else set()
        records = []
        for item in (found.value.values() if found is not None and isinstance(found.value, dict) else []):
            try:
                record = ExpertRecord.from_dict(getattr(item, "value", None))
            except RecordError:
                continue  # whatever a stranger stored: skipped
            if record.peer_id not in dead or record.peer_id == dht.peer_id.to_base58():  # it counts itself
                records.append(record)
        return records

    def _rebalance(self, dht: Any) -> None:
        """One check (heartbeat thread): move to a stage that lacks experts when the plan says this expert should,
        after the gap lasted ``rebalance_patience`` checks and a jittered second look still shows it."""
        assert self.servicer is not None
        if self.model is None or not self.config.rebalance or self.servicer.leaving:
            return
        me = self.servicer.peer_id
        target = self.moves.check(planned_move(self.stages, self._directory(dht), me), time.monotonic())
        if target is None:
            return
        if self._heartbeat_stop.wait(random.uniform(0, self.config.heartbeat_period)):
            return
        if planned_move(self.stages, self._directory(dht), me) != target:
            return  # someone else filled it, or the gap closed
        assert self._loop is not None
        moved = asyncio.run_coroutine_threadsafe(self._move(target), self._loop).result(timeout=60)
        if moved:
            self.moves.moved(time.monotonic())
            self._announce(dht)

    async def _warm_start(self) -> None:
        """Load the newest state of this expert's stage from a parameter mirror of the experiment, if one announces
        itself and has it (``ExpertConfig.warm_start``); a trainer that claims the expert may still replace it."""
        assert self.servicer is not None
        if not self.config.warm_start or not self.config.mirror_peers or self._p2p is None:
            return  # only mirrors that the expert's owner trusts (mirror_peers) may set its weights
        from lightning_distqat.mirror import fetch_from_mirrors

        backend = self.servicer.backend
        try:
            found = await fetch_from_mirrors(self._p2p, self._dht, self.config.experiment, backend.name,
                                             backend.fingerprint, self.config.access_token,
                                             trusted=set(self.config.mirror_peers))
        except Exception:  # noqa: BLE001 - no mirror, or one that cannot answer: random init stays
            log.debug("no warm start from a mirror", exc_info=True)
            return
        if found is None:
            return
        state, header = found
        try:
            await self.servicer._run(self.servicer._set_state, {k: v for k, v in state.items() if k != "optimizers"})
        except Exception as e:  # noqa: BLE001 - a state that does not fit: random init stays
            log.warning("expert for stage '%s': the mirror's state does not fit (%s)", backend.name, e)
            return
        log.info("expert …%s warm-started stage '%s' from a mirror (its state of %s, DiLoCo round %s)",
                 self.servicer.peer_id[-8:], backend.name,
                 time.strftime("%H:%M:%S", time.localtime(header.get("time", 0))), header.get("round"))

    async def _move(self, target: str) -> bool:
        """Serve ``target`` instead (on the event loop, so that no claim races it): only while unleased."""
        assert self.servicer is not None
        old = self.config.stage
        if self.servicer.lease_holder is not None or self.servicer.leaving:
            return False
        backend = await asyncio.get_running_loop().run_in_executor(None, self._backend, target)
        if self.servicer.lease_holder is not None:  # claimed meanwhile: stay
            return False
        sync = self.servicer.serve(backend)
        self.config = replace(self.config, stage=target)
        if sync is not None:
            await asyncio.get_running_loop().run_in_executor(None, sync.shutdown)
        await self._warm_start()
        log.info("expert …%s moved from stage '%s' to stage '%s', which lacked experts", self.servicer.peer_id[-8:],
                 old, target)
        return True

    def _heartbeat(self, dht: Any) -> None:
        while not self._heartbeat_stop.wait(self.config.heartbeat_period):
            try:
                self._announce(dht)
                self._rebalance(dht)
            except Exception:  # noqa: BLE001 - a missed heartbeat is logged; the next one may go through
                log.warning("heartbeat failed", exc_info=True)

