"""The shared-memory data server with real processes: three trainers share an epoch exactly once while one of them
is killed and restarted; Ctrl+C and SIGKILL of any party leave no shared memory behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from lightning_distqat.data.client import DataClient
from lightning_distqat.data.errors import DataServerError
from lightning_distqat.data.shm import segments_of
from tests.helpers import children_of, wait_gone

pytestmark = [pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
DIGIT_ROWS = 1797
SERVER_ARGS = ["data=digits", "data.image_size=8", "data.channels=1", "data.batch_size=16", "data.seed=3",
               "data.shuffle_buffer=500", "data.val_fraction=0", "data.drop_last=false"]


def _wait_for(predicate, seconds: float, what: str) -> None:
    deadline, poll = time.monotonic() + seconds, threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds}s waiting for {what}")
        poll.wait(0.1)


def _stop(process: subprocess.Popen, sig: int = signal.SIGINT, seconds: float = 30) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"process {process.pid} did not stop within {seconds}s of signal {sig}")


@pytest.fixture
def data_server(tmp_path):
    """A `distqat-data` process for 3 trainers; yields (process, address)."""
    address = f"/tmp/dq-{os.getpid()}-{tmp_path.name[-12:]}.sock"
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("distqat-data")), *SERVER_ARGS, "data.num_trainers=3",
         f"data.address={address}", f"hydra.run.dir={tmp_path}/server"],
        cwd=tmp_path, env=ENV, stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    try:
        DataClient(address).connect(timeout=60).close()
        yield process, address
    finally:
        if process.poll() is None:
            _stop(process)
        if os.path.exists(address):  # a killed server cannot unlink its socket (the next one at this address would)
            os.unlink(address)


def _trainer(address: str, tid: int, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.data_trainer", address, str(tid), str(out), *extra],
                            cwd=ROOT, env=ENV, stdout=open(f"{out}.log", "a"), stderr=subprocess.STDOUT)


@pytest.mark.timeout(420)
def test_three_trainers_one_killed_and_restarted_see_every_sample_once(data_server, tmp_path):
    server, address = data_server
    outs = [tmp_path / f"trainer{k}.ids" for k in range(3)]
    trainers = {0: _trainer(address, 0, outs[0]), 1: _trainer(address, 1, outs[1], "--hang-at", "5"),
                2: _trainer(address, 2, outs[2])}
    _wait_for(lambda: Path(f"{outs[1]}.hung").exists() or trainers[1].poll() is not None, 120, "trainer 1 to hang")
    assert trainers[1].poll() is None, Path(f"{outs[1]}.log").read_text()[-3000:]
    trainers[1].kill()  # SIGKILL mid-step: batch 5 was handed out (and one more prefetched) but never finished
    trainers[1].wait()
    assert len(outs[1].read_text().splitlines()) == 5
    trainers[1] = _trainer(address, 1, outs[1])
    for tid, process in trainers.items():
        try:
            code = process.wait(timeout=150)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            code = "timeout"
        assert code == 0, f"trainer {tid} exited with {code}:\n{Path(f'{outs[tid]}.log').read_text()[-3000:]}"

    seen = Counter()
    per_trainer = []
    for out in outs:
        ids = [int(i) for line in out.read_text().splitlines() for i in line.split()]
        per_trainer.append(len(out.read_text().splitlines()))
        seen.update(ids)
    twice = sorted(i for i, c in seen.items() if c > 1)
    assert not twice, f"samples seen more than once: {twice[:20]}"
    assert set(seen) == set(range(DIGIT_ROWS)), f"samples never seen: {sorted(set(range(DIGIT_ROWS)) - set(seen))}"
    assert per_trainer == [38, 38, 37]  # 113 batches of 16 dealt round-robin
    assert "resumes epoch 0 at batch 5" in Path(f"{outs[1]}.log").read_text()

    assert _stop(server) == 0, (tmp_path / "server.log").read_text()[-3000:]
    assert not os.path.exists(address), "the server left its socket behind"


def test_killed_server_leaves_no_shared_memory(data_server, tmp_path):
    server, address = data_server
    client = DataClient(address, 0, request_timeout=30).connect()
    try:
        client.start("train", 0)
        batches = client.batches()
        for _ in range(3):
            next(batches)
        assert segments_of(server.pid), "the server should hold batches in shared memory"
        server.kill()
        server.wait()
        with pytest.raises(DataServerError, match="lost the data server"):
            for _ in range(10):
                next(batches)
    finally:
        client.close()
    # multiprocessing's resource tracker of the dead server unlinks its segments
    _wait_for(lambda: not segments_of(server.pid), 20, f"segments of the killed server: {segments_of(server.pid)}")


def test_ctrl_c_of_a_trainer_with_an_embedded_server(tmp_path):
    out = tmp_path / "ids"
    process = _trainer("unused", 0, out, "--embedded", "--hang-at", "3")
    try:
        _wait_for(lambda: Path(f"{out}.hung").exists() or process.poll() is not None, 120, "the trainer to hang")
        assert process.poll() is None, Path(f"{out}.log").read_text()[-3000:]
        family = children_of(process.pid)
        servers = [pid for pid in family if segments_of(pid)]
        assert servers, f"expected an embedded data server holding batches among {family}"
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
        assert not wait_gone(family, 20), "the embedded server outlived its trainer"
        assert not any(segments_of(pid) for pid in servers)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.timeout(420)
@pytest.mark.swarm
def test_main_job_trains_from_the_data_server(tmp_path):
    """`make run`'s job (`distqat-train` with its default config), one epoch: ResNet-18 on 4 embedded experts, fed by
    the embedded shared-memory data server."""
    result = subprocess.run([str(Path(sys.executable).with_name("distqat-train")), "trainer.max_epochs=1",
                             "require_progress=true"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                            timeout=170)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Data server (embedded, pid" in output, output[-4000:]
    assert "Summary: 23 steps, 1472 samples" in output, output[-4000:]  # 1527 rows // 64, drop_last
