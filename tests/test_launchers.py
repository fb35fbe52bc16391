"""The launchers: fleet numbers from the DHT, the monitor's W&B run, the client's supervision of trainers (start one
per complete pipeline, restart a crashed one under its id, stop a broken one), the bring-your-own-machines flow with
every role as its own process from the console scripts, and distqat-local end to end."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lightning_distqat.config import ClientConfig, MonitorConfig, SwarmConfig, peers_from
from lightning_distqat.monitor import fleet_metrics, format_table
from lightning_distqat.supervisor import Supervisor, free_pipelines
from lightning_distqat.swarm.dht import start_dht
from lightning_distqat.swarm.records import ExpertRecord, RecordError, TrainerTelemetry, metrics_key, read_directory
from tests.helpers import read_wandb_history

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def _record(stage: str, n: int, leased: bool = False) -> ExpertRecord:
    return ExpertRecord(peer_id=f"Qm{stage}{n}", stage=stage, fingerprint="f", version=3, leased=leased)


def _telemetry(name: str, **kw) -> TrainerTelemetry:
    base = dict(trainer=name, step=10, loss=1.5, samples_per_s=100.0, samples=640, round=2, group_size=2,
                wire_bytes=1 << 20, experts=["QmA", "QmB"])
    return TrainerTelemetry(**{**base, **kw})


# ---------------------------------------------------------------------------------------------- pure logic
def test_fleet_metrics_count_experts_pipelines_and_trainers():
    records = [_record("a", 0, True), _record("a", 1), _record("a", 2), _record("b", 0, True), _record("b", 1)]
    telemetry = [_telemetry("trainer-0", loss=1.0), _telemetry("trainer-1", loss=2.0, samples_per_s=50.0),
                 _telemetry("trainer-2", loss=float("nan"), group_size=0)]
    m = fleet_metrics(records, telemetry, ["a", "b", "c"])
    assert m["experts/a/alive"] == 3 and m["experts/a/leased"] == 1 and m["experts/c/alive"] == 0
    assert m["fleet/pipelines"] == 0 and m["fleet/free_pipelines"] == 0  # stage c has nobody
    m = fleet_metrics(records, telemetry, ["a", "b"])
    assert m["fleet/pipelines"] == 2 and m["fleet/free_pipelines"] == 1
    assert m["fleet/loss"] == 1.5  # the mean of the finite losses
    assert m["fleet/samples_per_s"] == 250.0 and m["fleet/trainers"] == 3
    assert m["trainer/trainer-1/samples_per_s"] == 50.0 and math.isnan(m["trainer/trainer-2/loss"])
    assert m["fleet/round"] == 2 and m["fleet/group_size_min"] == 2 and m["fleet/wire_bytes"] == 3 << 20
    assert fleet_metrics(records, [], [])["experts/b/alive"] == 2  # no stage list: the announced stages
    table = format_table(m, telemetry, ["a", "b"], "exp")
    assert table[0].startswith("exp: 2 complete pipeline(s), 1 free; 3 trainer(s)") and len(table) == 1 + 2 + 3
    assert free_pipelines(records, ["a", "b"]) == 1 and free_pipelines(records, []) == 0


def test_telemetry_from_the_dht_is_checked():
    good = _telemetry("t").to_dict()
    assert TrainerTelemetry.from_dict(good) == _telemetry("t")
    for bad in ({**good, "step": -1}, {**good, "loss": float("inf")}, {**good, "samples_per_s": float("nan")},
                {**good, "experts": ["x"] * 65}, {**good, "trainer": ""}, {**good, "extra": 1}, {**good, "round": 1.0},
                "junk", None):
        with pytest.raises(RecordError):
            TrainerTelemetry.from_dict(bad)


def test_initial_peers_from_a_file(tmp_path):
    peers = tmp_path / "initial_peers.txt"
    peers.write_text("/ip4/127.0.0.1/tcp/1/p2p/QmA\n\n/ip4/127.0.0.1/tcp/2/p2p/QmB\n")
    want = ["/ip4/127.0.0.1/tcp/1/p2p/QmA", "/ip4/127.0.0.1/tcp/2/p2p/QmB"]
    assert peers_from(f"@{peers}", "X") == want and peers_from([f"@{peers}"], "X") == want
    assert SwarmConfig(initial_peers=f"@{peers}").initial_peers == want
    assert MonitorConfig(initial_peers=[f"@{peers}"]).initial_peers == want
    with pytest.raises(ValueError, match="SwarmConfig: initial_peers file .*missing.* cannot be read"):
        SwarmConfig(initial_peers=f"@{tmp_path}/missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="lists no multiaddr"):
        ClientConfig(initial_peers=f"@{tmp_path}/empty")
    with pytest.raises(ValueError, match="ClientConfig: max_trainers"):
        ClientConfig(max_trainers=0)


def test_public_addresses_and_overrides_that_parse_back():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from lightning_distqat.cli import as_overrides
    from lightning_distqat.swarm.dht import public_maddrs

    assert public_maddrs(None) == (["/ip4/127.0.0.1/tcp/0"], [])
    assert public_maddrs("203.0.113.7", 50000) == (["/ip4/0.0.0.0/tcp/50000"], ["/ip4/203.0.113.7/tcp/50000"])
    host, announce = public_maddrs("127.0.0.1")  # loopback stays on loopback, on a free port
    assert host == announce and re.fullmatch(r"/ip4/127\.0\.0\.1/tcp/[1-9]\d*", host[0])
    with pytest.raises(ValueError, match="public_ip 'my-host' is not an IP address"):
        public_maddrs("my-host")
    values = {"source": "data/my files, 'quoted' \"too\"", "mean": [0.5, 0.25], "address": None, "cache": False,
              "seq_len": 128, "_target_": "x.Y"}
    parser = OverridesParser.create()
    parsed = {o.key_or_group: o.value() for o in parser.parse_overrides(as_overrides("data", values))}
    assert parsed == {f"data.{k}": v for k, v in values.items() if k != "_target_"}


def test_the_supervisor_starts_one_trainer_per_free_pipeline_restarts_crashes_and_stops_the_stalled(tmp_path):
    """Real child processes stand in for trainers: 'crash' exits 3, 'done' exits 0, 'hang' sleeps."""
    fleet = {"records": [_record("a", 0), _record("a", 1), _record("b", 0)], "telemetry": []}
    behaviour = {0: ["crash", "done"], 1: ["hang"]}
    programs = {"crash": "import sys; sys.exit(3)", "done": "pass", "hang": "import time; time.sleep(60)"}
    started: list[tuple[int, bool]] = []

    def command(slot, restart):
        started.append((slot.index, restart))
        return [sys.executable, "-c", programs[behaviour[slot.index].pop(0)]]

    config = ClientConfig(max_trainers=2, restart_backoff=1.0, broken_timeout=5.0, start_grace=30.0)
    sup = Supervisor(config, ["a", "b"], command, lambda: (fleet["records"], fleet["telemetry"]),
                     lambda slot: str(tmp_path / f"{slot.name}.log"))
    try:
        sup.tick(now=0.0)
        assert started == [(0, False)]  # one complete free pipeline (stage b has one expert)
        sup.tick(now=0.5)
        assert started == [(0, False)]  # trainer-0 is starting (no telemetry yet): it counts as holding that one
        fleet["records"].append(_record("b", 1))
        sup.tick(now=0.6)
        assert started == [(0, False), (1, False)]  # a second complete pipeline
        sup.slots[0].process.wait(timeout=30)  # 'crash'
        sup.tick(now=1.0)
        assert sup.slots[0].exit_codes == [3] and "trainer-0 exited with 3" in sup.events[-1]
        sup.tick(now=1.5)
        assert len(started) == 2  # the backoff: not before now + 1 s
        sup.tick(now=2.2)
        assert started[-1] == (0, True)  # restarted under the same id, keeping its experts' weights
        sup.slots[0].process.wait(timeout=30)  # 'done'
        sup.tick(now=3.0)
        assert sup.slots[0].finished and "trainer-0 finished" in sup.events
        fleet["telemetry"] = [_telemetry("trainer-1", step=4)]
        sup.tick(now=4.0)
        assert sup.slots[1].last_step == 4
        sup.tick(now=9.5)  # no new step for 5.5 s > broken_timeout
        assert sup.slots[1].stopped_broken == 1 and not sup.slots[1].running
        assert any("made no step" in e for e in sup.events)
        assert sup.status() == "trainer-0 done (2 starts), trainer-1 waiting"
        assert "start 2:" in (tmp_path / "trainer-0.log").read_text()
    finally:
        sup.stop_all()


# ---------------------------------------------------------------------------------------------- whole processes
def _start(argv: list[str], cwd: Path, name: str) -> tuple[subprocess.Popen, Path]:
    out = cwd / f"{name}.out"
    with open(out, "wb") as f:
        proc = subprocess.Popen(argv, cwd=cwd, env=ENV, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, out


def _wait_for(predicate, timeout: float, what: str, procs=()):
    """Poll ``predicate`` (twice a second, up to ``timeout``), failing early if one of ``procs`` exits."""
    deadline = time.monotonic() + timeout
    poll = threading.Event()
    while not predicate():
        for p, out in procs:
            assert p.poll() is None, f"{out.name} exited with {p.returncode}:\n{out.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        poll.wait(0.5)


def _stop(procs, sig=signal.SIGINT, timeout=90):
    for p, _ in procs:
        if p.poll() is None:
            p.send_signal(sig)
    for p, out in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            raise AssertionError(f"{out.name} did not stop within {timeout}s of Ctrl+C")


@pytest.mark.swarm
@pytest.mark.timeout(420)
def test_bring_your_own_machines_on_loopback(tmp_path):
    """Host A: distqat-monitor and distqat-client (2 trainers); hosts B and C: distqat-expert num_servers=2 each.
    The client starts 2 trainers once 2 pipelines are complete; trainer-0 killed with SIGKILL is started again and
    resumes its data share; the monitor's offline W&B run holds the fleet's numbers; Ctrl+C stops every role."""
    exp = "byo-test"
    host_a, host_b, host_c = (tmp_path / h for h in ("a", "b", "c"))
    for h in (host_a, host_b, host_c):
        h.mkdir()
    peers_file = host_a / "logs" / exp / "initial_peers.txt"
    monitor = _start([str(BIN / "distqat-monitor"), f"experiment={exp}", "model=mlp_tiny", "public_ip=127.0.0.1",
                      "monitor.port=0", "monitor.period=1", f"monitor.wandb_dir={host_a}"], host_a, "monitor")
    procs = [monitor]
    try:
        _wait_for(peers_file.exists, 60, "initial_peers.txt", procs)
        peers = peers_file.read_text().split()
        assert peers and all(re.fullmatch(r"/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+", p) for p in peers), peers
        for host in (host_b, host_c):  # the README's server command, with the address copied from host A's file
            procs.append(_start([str(BIN / "distqat-expert"), f"initial_peers=[{peers[0]}]", "num_servers=2",
                                 "public_ip=127.0.0.1", "device=cpu", f"experiment={exp}", "model=mlp_tiny",
                                 "expert.heartbeat_period=1.0", "expert.record_ttl=4.0"], host, f"experts-{host.name}"))
        train = ["preset=smoke", "trainer.max_steps=2000", "trainer.max_epochs=1", "+swarm.lease_ttl=6.0",
                 "swarm.telemetry_period=0.5", "logger=none"]
        client = _start([str(BIN / "distqat-client"), f"initial_peers=@{peers_file}", f"experiment={exp}",
                         "client.max_trainers=2", "client.poll=0.5", "client.restart_backoff=1",
                         "train=[" + ",".join(f"'{o}'" for o in train) + "]", "data.batch_size=2"], host_a, "client")
        procs.append(client)
        client_out = client[1]
        _wait_for(lambda: len(re.findall(r"trainer-\d started \(pid", client_out.read_text())) == 2, 180,
                  "two trainers", procs)
        pid = int(re.search(r"trainer-0 started \(pid (\d+)", client_out.read_text()).group(1))
        log0 = host_a / "logs" / exp / "trainer-0.log"
        observer = start_dht(peers, experiment=exp)
        try:
            def steps() -> dict[str, int]:
                return {t.trainer: t.step for t in read_directory(observer, metrics_key(exp),
                                                                  TrainerTelemetry.from_dict)}
            _wait_for(lambda: steps().get("trainer-0", 0) >= 5, 180, "trainer-0's telemetry", procs)
            os.kill(pid, signal.SIGKILL)  # a few steps into its share of epoch 0
        finally:
            observer.shutdown()
        _wait_for(lambda: "trainer-0 restarted" in client_out.read_text(), 60, "the restart", procs)
        _wait_for(lambda: "resumes epoch 0 at batch" in log0.read_text(errors="replace"), 120,
                  "trainer-0 resuming its data share", procs)
        reports = monitor[1].read_text().count("complete pipeline(s)")  # one more report of the monitor
        _wait_for(lambda: monitor[1].read_text().count("complete pipeline(s)") > reports, 30, "a monitor report", procs)
    finally:
        _stop(list(reversed(procs)))
    assert "exited with -9" in client_out.read_text()
    history = read_wandb_history(host_a / "wandb")
    assert history, "the monitor's offline W&B run is empty"
    keys = set().union(*history)
    assert {"fleet/loss", "fleet/samples_per_s", "experts/blocks.0/alive", "experts/blocks.1/alive",
            "fleet/pipelines"} <= keys, sorted(keys)
    assert max(h.get("fleet/pipelines", 0) for h in history) == 2
    assert max(h.get("fleet/trainers", 0) for h in history) == 2
    assert any(h.get("fleet/samples_per_s", 0) > 0 for h in history)


@pytest.mark.swarm
@pytest.mark.timeout(300)
def test_distqat_local_runs_a_short_experiment_with_one_log_per_role(tmp_path):
    result = subprocess.run(
        [str(BIN / "distqat-local"), "experiment=local-test", "trainers=1", "spares=0", "wandb=false",
         "status_period=2", "train=['preset=smoke','trainer.max_steps=10','logger=none']"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=280,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    logs = tmp_path / "logs" / "local-test"
    assert {"monitor.log", "data.log", "client.log", "expert-blocks.0-0.log", "expert-blocks.1-0.log",
            "trainer-0.log"} <= {p.name for p in logs.iterdir()}
    assert "Summary: 10 steps" in (logs / "trainer-0.log").read_text()
    assert "experts 2/2 up" in result.stdout and "every role stopped" in result.stdout


def test_a_threading_event_stops_the_supervisor_run_loop(tmp_path):
    config = ClientConfig(max_trainers=1, poll=0.1)
    sup = Supervisor(config, ["a"], lambda s, r: [sys.executable, "-c", "import time; time.sleep(60)"],
                     lambda: ([_record("a", 0)], []), lambda slot: str(tmp_path / "t.log"))
    stopping = threading.Event()
    threading.Timer(1.0, stopping.set).start()
    lines: list[str] = []
    sup.run(stopping, on_status=lines.append)
    assert lines[0] == "trainer-0 starting" and not sup.slots[0].running  # Ctrl+C stopped the trainer it started


def test_help_says_what_each_role_does():
    scripts = ["distqat-train", "distqat-expert", "distqat-monitor", "distqat-client", "distqat-local", "distqat-data",
               "distqat-mirror"]
    running = {script: subprocess.Popen([str(BIN / script), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=ENV) for script in scripts}
    for script, proc in running.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{script}: {err[-2000:]}"
        first = out.splitlines()[0]
        assert "is powered by Hydra" not in first and len(first) > 40, f"{script}: {first}"
        assert "== Config ==" in out and "Any key is an override" in out, script
