"""Nobody writes where they don't belong, and no bad peer or bad request breaks the model: a real expert, a trainer
holding its lease, and a stranger with its own libp2p identity, all on loopback; the DHT with a rogue node; the data
server with another local user."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import hivemind
import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_distqat import DataConfig, ExpertError, ExpertUnavailableError, SwarmConfig
from lightning_distqat.config import ExpertConfig
from lightning_distqat.data.client import DataClient
from lightning_distqat.data.server import DataServer
from lightning_distqat.data.wire import send
from lightning_distqat.expert.servicer import ExpertServicer
from lightning_distqat.swarm.client import PipelineUnavailableError, SwarmClient
from lightning_distqat.swarm.dht import AsyncRunner, start_dht
from lightning_distqat.swarm.embedded import EmbeddedSwarm
from lightning_distqat.swarm.messages import collect, flatten_structure, pack, unpack
from lightning_distqat.swarm.records import experts_key, stage_fingerprint
from lightning_distqat.swarm.remote import ExpertHandle

pytestmark = [pytest.mark.swarm]
ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "security"


def _stage() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))


STAGE = _stage()
FINGERPRINT = stage_fingerprint(STAGE)


def _rss_mib(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:")) / 1024


@pytest.fixture(scope="module")
def swarm():
    """One expert of ``STAGE`` (small request limits), the trainer that holds its lease, and a stranger."""
    trainer = SwarmClient(SwarmConfig(experiment=EXPERIMENT, request_timeout=30, discovery_timeout=60, lease_ttl=30))
    expert = EmbeddedSwarm({"block": STAGE}, expert_config=ExpertConfig(experiment=EXPERIMENT, max_request_bytes=64 << 20,
                                                                          max_concurrent_per_peer=4))
    stranger = None
    try:
        expert.launch()
        trainer.start()
        expert.start(trainer.visible_maddrs)
        handle = trainer.claim_pipeline({"block": FINGERPRINT})["block"]
        handle.configure({0: {"cls": "torch.optim.sgd.SGD", "defaults": {"lr": 0.1},
                              "groups": [{"lr": 0.1, "param_names": [n for n, _ in STAGE.named_parameters()]}]}})
        stranger = SwarmClient(SwarmConfig(experiment=EXPERIMENT, initial_peers=trainer.visible_maddrs,
                                           request_timeout=30)).start()
        yield trainer, handle, stranger, stranger.handle("block", handle.peer_id), expert.pids[0]
    finally:
        if stranger is not None:
            stranger.shutdown()
        trainer.shutdown()
        expert.shutdown()


def _weights(handle) -> dict[str, torch.Tensor]:
    return handle.get_state()["module"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _forward_backward_is_right(handle) -> None:
    """The expert still computes what the stage computes (an inference call; no state changes)."""
    x = torch.randn(4, 8)
    layout, tensors = flatten_structure(((x,), {}))
    (out,), _ = handle.forward("check", layout, tensors, training=False, need_grad=False)
    local = _stage().eval()
    local.load_state_dict(_weights(handle))
    assert torch.allclose(out, local(x), atol=1e-5)


# ---------------------------------------------------------------------- leases
def test_a_stranger_cannot_use_release_or_take_a_leased_expert(swarm):
    trainer, handle, stranger, intruder, _ = swarm
    before = _weights(handle)
    zeros = {k: torch.zeros_like(v) for k, v in before.items()}
    attempts = (lambda: intruder.set_state({"module": zeros}),
                lambda: intruder.get_state(),
                lambda: intruder.step(0, [{"lr": 10.0}]),
                lambda: intruder.forward("x", *flatten_structure(((torch.randn(2, 8),), {})), training=True,
                                         need_grad=False))
    for attempt in attempts * 5:  # back to back: each refusal ends its session, the next call opens a new one
        with pytest.raises(ExpertError, match="needs the expert's lease"):
            attempt()
    # a header naming the holder proves nothing: the caller is its libp2p identity
    spoofed = intruder._unary("rpc_claim", {"ttl": 0.0, "trainer": trainer.peer_id, "claimant": trainer.peer_id})
    assert spoofed["granted"] is False
    assert intruder.claim(ttl=1e9)["granted"] is False
    assert _same(_weights(handle), before), "the stranger changed the weights"
    assert handle.claim(ttl=30)["granted"] is True, "the holder keeps its lease"
    info = intruder.info()
    assert info["leased"] is True and trainer.peer_id not in str(info), "the holder's identity must not be published"


def test_a_new_lease_holder_inherits_none_of_the_last_ones_work(swarm):
    """Gradients the last holder accumulated, its saved activations and its backward answers are gone when another
    trainer gets the lease: a step of the newcomer changes nothing, a repeated backward reveals nothing."""
    _, handle, _, intruder, _ = swarm
    params = lambda: {k: v for k, v in _weights(handle).items() if "running" not in k and "batches" not in k}  # noqa: E731
    original = _weights(handle)
    layout, tensors = flatten_structure(((torch.randn(4, 8),), {}))
    handle.forward("mine", layout, tensors, training=True, need_grad=True)
    handle.backward("mine", [torch.ones(4, 8)])  # gradients wait for the holder's step
    handle.forward("kept", layout, tensors, training=True, need_grad=True)
    before = params()
    handle.release()
    try:
        assert intruder.claim(ttl=30)["granted"] is True
        intruder.step(0, [{"lr": 10.0}])
        for request_id in ("mine", "kept"):
            with pytest.raises(ExpertError, match=f"no forward with id {request_id}"):
                intruder.backward(request_id, [torch.ones(4, 8)])
        after = {k: v for k, v in intruder.get_state()["module"].items() if k in before}
        assert _same(after, before), "the newcomer stepped the last holder's gradients"
    finally:
        intruder.release()
        assert handle.claim(ttl=30)["granted"] is True
        handle.set_state({"module": original})  # the training forwards moved BatchNorm's running stats


def test_network_requests_import_nothing_and_the_expert_stays_healthy(swarm, capfd):
    _, handle, _, _, pid = swarm
    names = [n for n, _ in STAGE.named_parameters()]
    for cls in ("this.X", "antigravity.X", "os.system", "torch.nn.Linear", "builtins.exit"):
        with pytest.raises(ExpertError, match="is not allowed on this expert"):
            handle.configure({1: {"cls": cls, "defaults": {}, "groups": [{"param_names": names}]}})
    with pytest.raises(ExpertError, match="unknown keys \\['params'\\]"):
        handle.step(0, [{"params": [], "lr": 0.1}])
    with pytest.raises(ExpertError, match="must be finite"):
        handle.step(0, [{"lr": float("inf")}])
    with pytest.raises(ExpertError, match="is not of the kind of the current"):
        handle.step(0, [{"lr": None}])
    with pytest.raises(ExpertError, match="two numbers >= 0"):
        handle.step(0, [{"lr": 0.1}], clip_norm=(1.0, -5.0))
    assert "Beautiful is better than ugly" not in capfd.readouterr().err, "a module was imported on request"
    os.kill(pid, 0)  # alive
    _forward_backward_is_right(handle)


def test_non_finite_inputs_and_gradients_never_reach_the_stage(swarm):
    _, handle, _, _, _ = swarm
    before = _weights(handle)
    bad = torch.randn(4, 8)
    bad[0, 0] = float("nan")
    with pytest.raises(ExpertError, match="input #0 holds non-finite values"):
        handle.forward("nan", *flatten_structure(((bad,), {})), training=True, need_grad=True)
    layout, tensors = flatten_structure(((torch.randn(4, 8),), {}))
    handle.forward("ok", layout, tensors, training=True, need_grad=True)
    with pytest.raises(ExpertError, match="gradient of stage 'block' output #0 holds non-finite values"):
        handle.backward("ok", [torch.full((4, 8), float("inf"))])
    state = _weights(handle)
    assert torch.isfinite(state["1.running_mean"]).all() and torch.isfinite(state["1.running_var"]).all()
    handle.backward("ok", [torch.zeros(4, 8)])  # finite: accepted (the context survived the refused one)
    handle.step(0, [{"lr": 0.1}])
    assert all(torch.isfinite(v).all() for v in _weights(handle).values())
    handle.set_state({"module": before})


def test_a_running_diloco_config_cannot_be_replaced(swarm):
    """The first trainer's DiLoCo config holds for the stage; a start with another (outer_lr=1e30) is refused."""
    from dataclasses import asdict

    from lightning_distqat import DiLoCoConfig

    _, handle, _, _, _ = swarm
    good = asdict(DiLoCoConfig())
    for change, message in [
        ({"outer_lr": 1e30}, "outer_lr must be at most 10"),
        ({"outer_lr": float("nan")}, "outer_lr must be a finite number"),
        ({"nesterov": "yes"}, "nesterov must be a bool"),
        ({"target_group_size": 10**9}, "target_group_size must be None or an int"),
        ({"averaging_timeout": 1e9}, "averaging_timeout must be at most 3600"),
        ({"outer_optimizer": "torch.optim.Adam", "outer_optimizer_kwargs": {"eps": float("inf")}}, "must be finite"),
        ({"outer_optimizer": "torch.optim.Adam", "outer_optimizer_kwargs": {"params": []}}, "unknown keys"),
        ({"outer_optimizer": "os.system"}, "is not allowed on this expert"),
    ]:  # refused before anything starts: a good config is still free to start afterwards
        with pytest.raises(ExpertError, match=message):
            handle.diloco("start", config={**good, **change}, solo=True)
    assert handle.diloco("start", config=good, solo=True)["round"] == 0
    with pytest.raises(ExpertError, match="already averages with another DiLoCo config"):
        handle.diloco("start", config={**asdict(DiLoCoConfig()), "outer_lr": 1e30}, solo=True)
    with pytest.raises(ExpertError, match="a DiLoCo config is a dict with keys among"):
        handle.diloco("start", config={"evil": 1}, solo=True)


class ExitsInForward(nn.Module):
    """A stage that ends its process when called (as a careless or hostile module might)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def forward(self, x):  # noqa: ANN001, ANN201
        raise SystemExit(3)


@pytest.mark.timeout(120)
def test_a_stage_that_exits_stops_its_expert_instead_of_leaving_it_half_alive():
    trainer = SwarmClient(SwarmConfig(experiment="exits", request_timeout=20, discovery_timeout=30))
    stage = ExitsInForward()
    expert = EmbeddedSwarm({"s": stage}, expert_config=ExpertConfig(experiment="exits"))
    try:
        expert.launch()
        trainer.start()
        expert.start(trainer.visible_maddrs)
        handle = trainer.claim_pipeline({"s": stage_fingerprint(stage)})["s"]
        with pytest.raises(ExpertError, match="SystemExit"):
            handle.forward("x", *flatten_structure(((torch.ones(1, 2),), {})), training=True, need_grad=True)
        process = expert._experts[0].process
        assert process.wait(timeout=30) != 0, "the expert should have stopped with an error"
        with pytest.raises(ExpertUnavailableError):
            handle.info(timeout=5)
    finally:
        trainer.shutdown()
        expert.shutdown()


def test_a_call_without_the_lease_is_refused_on_its_first_message(swarm):
    """A stranger's training forward announcing 32 messages of 1 MiB is refused after its header: the refusal
    arrives while the rest is still unsent, so the expert never buffers it."""
    _, handle, stranger, _, _ = swarm
    layout, tensors = flatten_structure(((torch.randn((32 << 20) // 32, 8),), {}))
    messages = list(pack(runtime_pb2.ExpertRequest, {"request_id": "big", "layout": layout, "training": True,
                                                     "need_grad": True}, tensors))
    assert len(messages) >= 32
    stub = ExpertServicer.get_stub(stranger.p2p, PeerID.from_base58(handle.peer_id))
    sent = []

    async def call() -> tuple:
        answered = asyncio.Event()

        async def requests():  # noqa: ANN202
            for message in messages:
                sent.append(message)
                yield message
                if len(sent) == 1:  # hold the rest back until the answer came (or 20 s passed)
                    try:
                        await asyncio.wait_for(answered.wait(), 20)
                    except asyncio.TimeoutError:
                        pass
                    return

        stream = await stub.rpc_forward(requests())
        answer = await collect(stream)
        answered.set()
        return unpack(answer)[0], len(sent)

    header, count = stranger.runner.run(call(), timeout=60)
    assert count == 1 and "needs the expert's lease" in header["error"], (count, header)
    _forward_backward_is_right(handle)


# ---------------------------------------------------------------------- fuzzing and floods
KEYS = ["request_id", "layout", "training", "need_grad", "enc", "reply_codec", "index", "groups", "clip_norm",
        "clip_value", "op", "config", "samples", "norm_type", "ttl", "optimizers", "qat", "proof", "_n", "tree",
        "leaves", "call", "acks", "norm", "reply_shm", "state"]
_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=12)
    | st.sampled_from(["t", "none", "int8", "int4", "fp16", "start", "round", "finish", "torch.optim.SGD", "forward",
                       "backward", "step", "grad_norm", "get_state", "set_state"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS + ["c", "n", "block", "shape",
                                                                                       "dtype", "scale"]),
                                                                 inner, max_size=5),
    max_leaves=12,
)
_dtypes = st.sampled_from([torch.float32, torch.float16, torch.int8, torch.int64, torch.uint8, torch.bool])
_tensors = st.builds(lambda dtype, shape: torch.zeros(shape, dtype=dtype), _dtypes,
                     st.lists(st.integers(0, 5), max_size=3))
_raw_tensor = st.builds(runtime_pb2.Tensor, buffer=st.binary(max_size=64), size=st.lists(st.integers(0, 2**31), max_size=3),
                        dtype=st.sampled_from(["float32", "object", "int8", "complex64", "", "bfloat16"]),
                        compression=st.integers(0, 8), chunks=st.integers(0, 3))
REQUEST = st.one_of(
    st.tuples(st.just("packed"), st.dictionaries(st.sampled_from(KEYS), _values, max_size=8),
              st.lists(_tensors, max_size=3)),
    st.tuples(st.just("raw"), st.binary(max_size=64), st.lists(_raw_tensor, max_size=3)),
)
STREAMED = ["rpc_forward", "rpc_backward", "rpc_set_state", "rpc_session"]
UNARY = ["rpc_step", "rpc_configure", "rpc_grad_norm", "rpc_diloco", "rpc_claim", "rpc_info", "rpc_get_state"]


def _send(client: SwarmClient, peer_id: str, method: str, request) -> None:  # noqa: ANN001
    """One fuzzed call from ``client``; only the expert's health matters, not the answer."""
    kind, first, second = request
    if kind == "packed":
        messages = list(pack(runtime_pb2.ExpertRequest, first, second))
    else:
        messages = [runtime_pb2.ExpertRequest(metadata=first, tensors=second)]
    stub = ExpertServicer.get_stub(client.p2p, PeerID.from_base58(peer_id))

    async def go() -> None:
        if method in STREAMED:
            async def requests():  # noqa: ANN202
                for message in messages:
                    yield message

            unpack(await collect(await getattr(stub, method)(requests())))
        else:
            await getattr(stub, method)(messages[0])

    try:
        client.runner.run(go(), timeout=20)
    except Exception:  # noqa: BLE001 - the call may fail in any way; the expert must not
        pass


@settings(max_examples=1000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(method=st.sampled_from(STREAMED + UNARY), request=REQUEST)
def test_fuzzed_requests_from_a_stranger(swarm, method, request):
    _, handle, stranger, _, _ = swarm
    _send(stranger, handle.peer_id, method, request)


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(method=st.sampled_from(["rpc_backward", "rpc_set_state", "rpc_step", "rpc_configure", "rpc_grad_norm",
                               "rpc_get_state", "rpc_session"]), request=REQUEST)
def test_fuzzed_requests_from_the_lease_holder(swarm, method, request):
    trainer, handle, _, _, _ = swarm
    _send(trainer, handle.peer_id, method, request)


def test_after_the_fuzzing_the_expert_is_unchanged_and_bounded(swarm):
    """Runs after the two fuzz tests (file order): weights as configured, memory below 1.5 GiB, answers right."""
    _, handle, _, _, pid = swarm
    assert _same(_weights(handle), _stage().state_dict()), "fuzzed requests changed the weights"
    assert _rss_mib(pid, "VmHWM") < 1536, f"the expert's memory peaked at {_rss_mib(pid, 'VmHWM'):.0f} MiB"
    _forward_backward_is_right(handle)


def test_a_flood_of_large_concurrent_requests_stays_within_the_budget(swarm):
    """200 concurrent 8 MiB inference calls from one stranger: at most 4 run at once (max_concurrent_per_peer), the
    rest are refused at once; the expert's peak memory grows by far less than the 1.6 GB sent."""
    _, handle, stranger, _, pid = swarm
    before = _rss_mib(pid)
    x = torch.randn((8 << 20) // 32, 8)
    layout, tensors = flatten_structure(((x,), {}))
    messages = list(pack(runtime_pb2.ExpertRequest, {"request_id": "f", "layout": layout, "training": False,
                                                     "need_grad": False}, tensors))
    stub = ExpertServicer.get_stub(stranger.p2p, PeerID.from_base58(handle.peer_id))

    async def one() -> str:
        async def requests():  # noqa: ANN202
            for message in messages:
                yield message

        header, _ = unpack(await collect(await stub.rpc_forward(requests())))
        return "refused" if header and "too many concurrent" in header.get("error", "") else "served"

    async def flood() -> list:
        return await asyncio.gather(*[one() for _ in range(200)], return_exceptions=True)

    outcomes = stranger.runner.run(flood(), timeout=300)
    assert outcomes.count("refused") > 0 and outcomes.count("served") > 0, outcomes[:10]
    grew = _rss_mib(pid, "VmHWM") - before
    assert grew < 640, f"the flood grew the expert by {grew:.0f} MiB"
    _forward_backward_is_right(handle)


# ---------------------------------------------------------------------- the DHT
def test_rogue_dht_records_are_rejected_and_trainers_still_claim(swarm):
    """A node without validators stores: a record under the expert's own (signed) subkey, garbage under its own
    subkey, a plain value under the directory key, a record for a stage with a peer id that does not parse, and one
    that claims to live for a year. Honest nodes refuse all of it; a new trainer still claims the real expert."""
    trainer, handle, _, _, _ = swarm
    key = experts_key(EXPERIMENT)
    found = trainer.dht.get(key, latest=True)
    victim_subkey = next(iter(found.value))
    rogue = hivemind.DHT(initial_peers=trainer.visible_maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    try:
        now = get_dht_time()
        fake = {"peer_id": "12D3KooWrogue", "stage": "block", "fingerprint": FINGERPRINT, "version": 99,
                "throughput": 1e9, "leased": False}
        rogue.store(key, subkey=victim_subkey, value=fake, expiration_time=now + 60)
        rogue.store(key, subkey=b"[owner:ssh-rsa rogue]", value={"junk": True}, expiration_time=now + 60)
        rogue.store(key, value="not a directory", expiration_time=now + 60)
        rogue.store(key, subkey=b"[owner:ssh-rsa other]", value={**fake, "peer_id": "not a peer id"},
                    expiration_time=now + 60)
        rogue.store(key, subkey=victim_subkey, value={**fake, "peer_id": handle.peer_id}, expiration_time=now + 3e7)
        records = trainer.directory("block")
        assert [r.peer_id for r in records] == [handle.peer_id], records
        newcomer = SwarmClient(SwarmConfig(experiment=EXPERIMENT, initial_peers=trainer.visible_maddrs,
                                           discovery_timeout=5, request_timeout=10)).start()
        try:
            with pytest.raises(PipelineUnavailableError, match="1 announced, 1 leased"):
                newcomer.claim_pipeline({"block": FINGERPRINT})  # the real one is leased: nothing else is there
            trainer.release_all()  # the real one is free now: the newcomer claims it, and nothing rogue
            assert newcomer.claim_pipeline({"block": FINGERPRINT})["block"].peer_id == handle.peer_id
        finally:
            newcomer.shutdown()  # releases: the module's trainer takes its lease back for the tests after this one
        assert handle.claim(ttl=300)["granted"] is True
    finally:
        rogue.shutdown()


@pytest.mark.timeout(240)
def test_an_access_token_keeps_strangers_out_of_an_experiment():
    """Without the token a node cannot join the experiment's DHT, and an expert refuses its calls even over a direct
    libp2p connection; with the token a trainer claims and uses the expert."""
    token = "s3cret-token"
    trainer = SwarmClient(SwarmConfig(experiment="guarded", access_token=token, discovery_timeout=60))
    expert = EmbeddedSwarm({"block": _stage()}, expert_config=ExpertConfig(experiment="guarded", access_token=token))
    node = runner = None
    try:
        expert.launch()
        trainer.start()
        (info,) = expert.start(trainer.visible_maddrs)
        handle = trainer.claim_pipeline({"block": FINGERPRINT})["block"]
        assert handle.info()["stage"] == "block"
        with pytest.raises(RuntimeError, match="bootstrap failed"):
            SwarmClient(SwarmConfig(experiment="guarded", initial_peers=trainer.visible_maddrs, request_timeout=10)
                        ).start()
        node = start_dht(info["maddrs"], experiment="guarded", ensure_bootstrap_success=False)  # dial the expert
        runner = AsyncRunner().start()
        outsider = ExpertHandle("block", info["peer_id"], runner.run(node.replicate_p2p(), 30), runner, timeout=10)
        for call in (outsider.info, lambda: outsider.claim(ttl=10)):
            with pytest.raises(ExpertError, match="protected experiment"):
                call()
        handle.release()
        insider = SwarmClient(SwarmConfig(experiment="guarded", initial_peers=trainer.visible_maddrs,
                                          access_token=token, discovery_timeout=30)).start()
        try:
            assert insider.claim_pipeline({"block": FINGERPRINT})["block"].info()["leased"] is True
        finally:
            insider.shutdown()
    finally:
        if runner is not None:
            runner.shutdown()
        if node is not None:
            node.shutdown()
        trainer.shutdown()
        expert.shutdown()


# ---------------------------------------------------------------------- another local user
NOBODY = 65534


def _as_nobody(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` as user ``nobody`` with the system's Python (the project's may sit where nobody may not enter)."""
    python = next(p for p in ("/usr/bin/python3", "/usr/local/bin/python3", sys.executable) if os.path.exists(p))
    return subprocess.run([python, "-c", textwrap.dedent(code)], user=NOBODY, group=NOBODY, capture_output=True,
                          text=True, timeout=60, cwd="/", env={"PATH": "/usr/bin:/bin"})


def test_another_local_user_cannot_reach_the_data_server_or_ack_for_another_trainer(tmp_path):
    config = DataConfig(source="sklearn-digits", image_size=8, batch_size=32, num_trainers=2, name="guard",
                        val_fraction=0.2)
    with DataServer(config) as server:
        directory = os.path.dirname(server.address)
        mode = os.stat(directory).st_mode & 0o777
        assert mode == 0o700 and os.stat(directory).st_uid == os.getuid(), oct(mode)
        assert os.stat(server.address).st_mode & 0o077 == 0
        if os.geteuid() == 0:  # a real second user: cannot even reach the socket
            result = _as_nobody(f"""
                import socket
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect({server.address!r}); s.sendall(b"x" * 8); print("CONNECTED", s.recv(10))
                except OSError as e:
                    print("REFUSED", type(e).__name__)
            """)
            assert "REFUSED" in result.stdout, result.stdout + result.stderr
        # the same user, but a pickle instead of a message: that connection ends, the server serves on
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(server.address)
        sock.sendall(len(b"cos\nsystem\n(S'true'\ntR.").to_bytes(4, "big") + b"cos\nsystem\n(S'true'\ntR.")
        assert sock.recv(10) == b"", "a malformed message must close that connection"
        sock.close()
        first, second = DataClient(server.address, 0).connect(), DataClient(server.address, 1).connect()
        try:
            first.start("train", 0)
            second.start("train", 0)
            send(second._sock, ["ack", 0, 0, 0])  # trainer 1 acknowledges trainer 0's first batch
            second.info()  # a round trip: the ack before it was handled
            assert server._acked.get((0, 0), 0) == 0, "trainer 1 counted a batch for trainer 0"
            third = DataClient(server.address, 0).connect()  # trainer 0's id again, on the validation split
            try:
                third.start("validation", 0)
                send(third._sock, ["ack", 0, 0, 0])
                third.info()
                assert server._acked.get((0, 0), 0) == 0, "a validation connection counted a training batch"
            finally:
                third.close()
            first.ack(0, 0)
            first.info()
            assert server._acked.get((0, 0)) == 1
        finally:
            first.close()
            second.close()


def test_a_socket_directory_that_another_user_made_is_refused(tmp_path):
    """Another user who made our socket directory first (to plant a server there) is found out; so is one that
    others may enter. (Owned by another user needs root to arrange; without root, the open mode is what is tried.)"""
    planted = tmp_path / f"distqat-{os.getuid()}"
    planted.mkdir()
    if os.geteuid() == 0:
        os.chown(planted, NOBODY, NOBODY)
    else:
        planted.chmod(0o755)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("XDG_RUNTIME_DIR", None)
    code = ("from lightning_distqat.data.wire import private_dir\n"
            "try:\n    private_dir()\nexcept PermissionError as e:\n    print('REFUSED', e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert "REFUSED" in result.stdout and str(planted) in result.stdout, result.stdout + result.stderr


def test_a_stream_message_announcing_a_gigabyte_is_not_read(swarm):
    """hivemind would read a stream message of any announced length; ours stop at 16 MiB and close that stream."""
    _, handle, stranger, _, pid = swarm
    before = _rss_mib(pid)
    name = ExpertServicer._get_handle_name(None, "rpc_forward")

    async def attack() -> bytes:
        _, reader, writer = await stranger.p2p.call_binary_stream_handler(PeerID.from_base58(handle.peer_id), name)
        writer.write(b"\x00" + (1 << 30).to_bytes(8, "big"))
        try:
            for _ in range(40):  # 40 MiB of the announced gigabyte
                writer.write(bytes(1 << 20))
                await writer.drain()
        except (ConnectionError, OSError):
            pass  # the expert closed the stream: what we want
        try:
            data = await asyncio.wait_for(reader.read(), 30)
        except (ConnectionError, OSError):
            data = b""  # reset by the expert
        writer.close()
        return data

    assert stranger.runner.run(attack(), timeout=60) == b"", "the expert answered a message it should not read"
    assert _rss_mib(pid) - before < 64, "the expert buffered the oversized message"
    _forward_backward_is_right(handle)


# ---------------------------------------------------------------------- session streams
def _session(client: SwarmClient, peer_id: str, requests: list[list]) -> list[dict]:
    """Open a session stream from ``client``, send each call (a list of messages) in turn and read one answer per
    call; then close it. Returns the answers' headers."""
    stub = ExpertServicer.get_stub(client.p2p, PeerID.from_base58(peer_id))

    async def go() -> list[dict]:
        outgoing: asyncio.Queue = asyncio.Queue()
        for messages in requests:
            outgoing.put_nowait(messages)

        async def stream():  # noqa: ANN202
            while True:
                for message in await outgoing.get():
                    yield message

        replies = await stub.rpc_session(stream())
        headers = []
        try:
            for _ in requests:
                headers.append(unpack(await collect(replies, keep_open=True))[0])
                if headers[-1] is not None and headers[-1].get("call") == -1:
                    break
        finally:
            await replies.aclose()
        return headers

    return client.runner.run(go(), timeout=60)


def _call(op: str, number: int, header: dict, tensors=()) -> list:  # noqa: ANN001
    return list(pack(runtime_pb2.ExpertRequest, {**header, "op": op, "call": number}, list(tensors)))


def test_a_session_checks_every_call_as_if_it_came_alone(swarm):
    """On a stranger's session stream: an unknown op gets an error and the session goes on, an inference forward is
    answered, each answer naming its call, in order; a training forward (no lease) is refused on its first message,
    and the session ends there (nothing after it is read: call -1); so does a call without a number. The expert's
    weights are unchanged."""
    _, handle, stranger, _, _ = swarm
    before = _weights(handle)
    layout, tensors = flatten_structure(((torch.randn(4, 8),), {}))
    forward = {"request_id": "s", "layout": layout}
    inference = {**forward, "training": False, "need_grad": False}
    answers = _session(stranger, handle.peer_id, [
        _call("format_disk", 0, {}),
        _call("forward", 1, inference, tensors),
        _call("forward", 2, {**forward, "training": True, "need_grad": True}, tensors),
        _call("forward", 3, inference, tensors),
    ])
    assert [a["call"] for a in answers] == [0, 1, 2, -1], answers
    assert "op is one of" in answers[0]["error"] and "format_disk" in answers[0]["error"]
    assert "error" not in answers[1] and "layout" in answers[1]
    assert "needs the expert's lease" in answers[2]["error"], answers
    for refused in (_call("step", 0, {"index": 0, "groups": [{"lr": 10.0}]}),
                    _call("set_state", 0, {}, [torch.zeros(3, dtype=torch.uint8)])):
        answers = _session(stranger, handle.peer_id, [refused, _call("forward", 1, inference, tensors)])
        assert [a["call"] for a in answers] == [0, -1], answers
        assert "needs the expert's lease" in answers[0]["error"], answers
    answers = _session(stranger, handle.peer_id, [
        list(pack(runtime_pb2.ExpertRequest, {**inference, "op": "forward", "call": "x"}, tensors)),
        _call("forward", 1, inference, tensors)])
    assert [a["call"] for a in answers] == [-1] and "call number" in answers[0]["error"], answers
    answers = _session(stranger, handle.peer_id, [list(pack(runtime_pb2.ExpertRequest, {"op": [1], "call": 0}))])
    assert answers[0]["call"] == 0 and "op is one of" in answers[0]["error"], answers
    assert _same(_weights(handle), before)
    _forward_backward_is_right(handle)


def test_a_session_request_that_breaks_the_format_ends_that_session_only(swarm):
    """A session call announcing more messages than an expert accepts ends its session with an error for call -1
    (nothing after it is read); the lease holder's own session goes on."""
    _, handle, stranger, _, _ = swarm
    flood = runtime_pb2.ExpertRequest(metadata=pack_header({"op": "forward", "call": 0, "_n": 10 ** 9}))
    answers = _session(stranger, handle.peer_id, [[flood], _call("forward", 1, {})])
    assert len(answers) == 1 and answers[0]["call"] == -1 and "announces" in answers[0]["error"], answers
    _forward_backward_is_right(handle)


def pack_header(header: dict) -> bytes:
    from hivemind.utils.serializer import MSGPackSerializer

    return MSGPackSerializer.dumps(header)
