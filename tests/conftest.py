"""Shared fixtures. Every test is policed for leaks: child processes, p2pd daemons, threads and /dev/shm entries
that outlive it fail the test (the idea of Lightning's own autouse fixtures)."""

from __future__ import annotations

import os

# Tests never reach the Hugging Face Hub: hub names fail at once instead of after network retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import threading
import time

import pytest

from tests.helpers import children_of, describe, kill_pids, p2pd_pids, shm_entries, wire_slot_alive

LEAK_GRACE_SECONDS = 15.0


@pytest.fixture(scope="session", autouse=True)
def process_singletons():
    """Per-process singletons that live until the interpreter exits, where they are freed: hivemind's MPFuture
    backend thread and its pooled torch shared-memory buffer (served by torch_shm_manager and multiprocessing's
    resource-sharer thread), and multiprocessing's resource tracker (started by the first spawned process). Create
    them before the first leak baseline, so that the leak check sees only what a test itself left behind."""
    from multiprocessing import resource_tracker

    import tqdm

    tqdm.tqdm.monitor_interval = 0  # no tqdm monitor thread (a process singleton) from datasets' progress bars

    from lightning_distqat.swarm.dht import start_dht

    resource_tracker.ensure_running()
    dht = start_dht()
    try:
        dht.get("warm-up", latest=True)
    finally:
        dht.shutdown()
    yield


@pytest.fixture(scope="module", autouse=True)
def no_wire_slots_after_the_module():
    """The test process's own shared-memory slots (its trainers' handles) are unlinked once a module's swarms end."""
    before = shm_entries()
    yield
    mine = sorted(e for e in shm_entries() - before if e.startswith(f"distqat_wire_{os.getpid()}_"))
    assert not mine, f"/dev/shm entries of this process left behind by the module: {mine}"


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves processes, p2pd daemons, threads or shared-memory segments behind."""
    children_before = children_of(os.getpid())
    p2pd_before = p2pd_pids()
    threads_before = {t.ident for t in threading.enumerate()}
    shm_before = shm_entries()
    yield
    deadline = time.monotonic() + LEAK_GRACE_SECONDS
    poll = threading.Event()
    while True:
        children = children_of(os.getpid()) - children_before
        daemons = p2pd_pids() - p2pd_before
        threads = [
            t for t in threading.enumerate()
            if t.ident not in threads_before and t.is_alive() and not t.name.startswith(("pydevd", "asyncio_"))
        ]
        # torch_<pid>_* segments are torch's (hivemind's MPFuture pool allocates them in every process that makes a
        # future). torch_shm_manager unlinks them when their process tree ends; those of processes forked from this
        # one (in-process DHT nodes and averagers) only when pytest exits. test_shutdown and the DiLoCo fault test
        # check whole trainer process trees for them; everything else under /dev/shm is checked here, per test.
        # distqat_wire_<pid>_* are shared-memory slots of a trainer or an expert; module-scoped swarms keep theirs
        # between tests, so a slot counts here once its owner is gone (and the test process's own at module end).
        shm = {e for e in shm_entries() - shm_before if not e.startswith("torch_") and not wire_slot_alive(e)}
        if not (children or daemons or threads or shm) or time.monotonic() > deadline:
            break
        poll.wait(0.2)
    leftovers = describe(children | daemons)
    kill_pids(children | daemons)  # ours: started by this test; ended so the next test starts clean
    problems = []
    if children:
        problems.append(f"child processes left running: {leftovers}")
    if daemons:
        problems.append(f"p2pd daemons left running: {sorted(daemons)}")
    if threads:
        problems.append(f"threads left running: {[t.name for t in threads]}")
    if shm:
        problems.append(f"/dev/shm entries left behind: {sorted(shm)}")
    assert not problems, "; ".join(problems)
