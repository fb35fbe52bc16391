"""Pure logic, no network: records, messages, optimizer splitting."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.proto import runtime_pb2
from torch import nn

from lightning_distqat.expert.backend import StageBackend, StageError
from lightning_distqat.swarm.client import rank_candidates
from lightning_distqat.swarm.messages import (CHUNK_BYTES, LayoutError, Malformed, flatten_structure, pack,
                                              parts_to_state, state_to_parts, state_to_tensor, tensor_to_state,
                                              unpack, unpack_stream)
from lightning_distqat.swarm.optimizers import OptimizerSplit
from lightning_distqat.swarm.records import ExpertRecord, RecordError, stage_fingerprint


def test_fingerprint_tracks_names_and_shapes():
    assert stage_fingerprint(nn.Linear(4, 3)) == stage_fingerprint(nn.Linear(4, 3))
    assert stage_fingerprint(nn.Linear(4, 3)) != stage_fingerprint(nn.Linear(4, 5))
    assert stage_fingerprint(nn.Linear(4, 3)) != stage_fingerprint(nn.Sequential(nn.Linear(4, 3)))


def test_record_validation():
    good = ExpertRecord(peer_id="p", stage="s", fingerprint="f", version=3, throughput=2.0, leased=True)
    assert ExpertRecord.from_dict(good.to_dict()) == good
    for bad in ["x", {"peer_id": 1, "stage": "s", "fingerprint": "f"}, {**good.to_dict(), "evil": True},
                {**good.to_dict(), "leased": 3}, {**good.to_dict(), "throughput": float("nan")},
                {**good.to_dict(), "version": -1}, {**good.to_dict(), "throughput": 2}, {**good.to_dict(), "stage": ""}]:
        with pytest.raises(RecordError):
            ExpertRecord.from_dict(bad)


def test_rank_candidates_prefers_free_newer_and_faster():
    records = [
        ExpertRecord(peer_id="a", stage="s", fingerprint="f", throughput=1.0, leased=True),
        ExpertRecord(peer_id="b", stage="s", fingerprint="f", throughput=1.0),
        ExpertRecord(peer_id="c", stage="s", fingerprint="f", throughput=5.0),
        ExpertRecord(peer_id="e", stage="s", fingerprint="f", version=2, throughput=0.5),
        ExpertRecord(peer_id="d", stage="s", fingerprint="wrong", throughput=9.0),
    ]
    assert [r.peer_id for r in rank_candidates(records, "f")] == ["e", "c", "b", "a"]


def test_pack_unpack_round_trip_splits_large_tensors():
    big = torch.randn(3 * CHUNK_BYTES // 4 + 5)  # > 3 chunks
    tensors = [torch.arange(6).view(2, 3), big, torch.empty(0), torch.randn(2, dtype=torch.bfloat16)]
    messages = list(pack(runtime_pb2.ExpertRequest, {"k": (1, 2), "s": "x"}, tensors))
    assert len(messages) >= 4 and all(m.ByteSize() < 4 * 2**20 for m in messages)
    header, out = unpack(messages)
    assert header == {"k": (1, 2), "s": "x"}
    assert len(out) == len(tensors) and all(torch.equal(a, b) for a, b in zip(out, tensors))
    assert tensor_to_state(state_to_tensor({"a": torch.ones(2), 1: [3, "b"]})).keys() == {"a", 1}
    assert unpack(messages[:-1]) == (None, [])  # a stream cut short is no answer, not a wrong one
    assert unpack([]) == (None, [])


def test_a_state_travels_as_a_skeleton_and_its_tensors():
    """What get_state returns (str and int keys, tuples, 0-d tensors, plain values) survives the msgpack header and
    comes back with the same types; a skeleton that does not fit its tensors is refused, whatever is wrong."""
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"module": model.state_dict(), "optimizers": {0: optimizer.state_dict()}, "round": 3,
             "flags": (True, None, 1.5, "x"), "empty": {}, "nested": [[torch.tensor(7)]]}
    skeleton, tensors = state_to_parts(state)
    header, out = unpack(list(pack(runtime_pb2.ExpertRequest, {"state": skeleton}, tensors)))
    back = parts_to_state(header["state"], out)
    assert back.keys() == state.keys() and back["round"] == 3 and back["flags"] == (True, None, 1.5, "x")
    assert back["optimizers"][0]["param_groups"][0]["betas"] == optimizer.state_dict()["param_groups"][0]["betas"]
    assert isinstance(back["optimizers"][0]["param_groups"][0]["betas"], tuple)
    assert back["optimizers"][0]["state"].keys() == {0, 1}
    fresh = torch.optim.Adam(nn.Linear(3, 2).parameters())
    fresh.load_state_dict(back["optimizers"][0])  # loads into a real optimizer
    for key, value in model.state_dict().items():
        assert torch.equal(back["module"][key], value)
    assert torch.equal(back["nested"][0][0], torch.tensor(7))
    with pytest.raises(LayoutError, match="neither str nor int"):
        state_to_parts({(1, 2): torch.ones(1)})
    with pytest.raises(LayoutError, match="holds a"):
        state_to_parts({"a": object()})
    one = [torch.ones(1)]
    for bad in (["t", 1], ["t", True], ["t", "0"], ["x", 0], ["d", [[1.5, ["v", 0]]]], ["d", [[True, ["v", 0]]]],
                ["v", [1]], ["l", [["t", 0], ["t", 0]]], ["d", [["a", ["v", 1]]]], "t", ["t"], None,
                ["l", [["l", [["l", [["l", [["l", [["l", [["l", [["l", [["l", [["l", [["l", [["l", [["l", [["l",
                 [["l", [["l", [["l", [["t", 0]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]):
        with pytest.raises(Malformed):
            parts_to_state(bad, one)


def test_unpack_stream_reads_the_announced_messages_then_closes_the_stream():
    messages = list(pack(runtime_pb2.ExpertResponse, {"ok": 1}, [torch.randn(CHUNK_BYTES // 2)] * 3))
    sent, closed = [], []

    async def stream():
        try:
            for message in messages + [runtime_pb2.ExpertResponse()] * 5:  # the caller must not wait for more
                sent.append(message)
                yield message
        finally:
            closed.append(True)

    header, tensors = asyncio.run(unpack_stream(stream()))
    assert header == {"ok": 1} and len(tensors) == 3
    assert len(sent) == len(messages) >= 2 and closed == [True]

    async def cut_short():
        for message in messages[:-1]:
            yield message

    assert asyncio.run(unpack_stream(cut_short())) == (None, [])


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 2)
        self.c = nn.Parameter(torch.ones(1))


def _train_one_step(net, opt):
    opt.zero_grad()
    (net.b(net.a(torch.randn(4, 3))) * net.c).sum().backward()
    opt.step()


def test_optimizer_split_merge_and_split_are_inverse():
    torch.manual_seed(0)
    net = _Net()
    opt = torch.optim.AdamW([{"params": [net.a.weight, net.c]}, {"params": [net.a.bias, *net.b.parameters()],
                                                                   "lr": 0.1}])
    _train_one_step(net, opt)
    full = opt.state_dict()

    split = OptimizerSplit.create(opt, 0, {"a": net.a, "b": net.b})
    assert split.stages == ["a", "b"]
    assert split.expert_spec("b")["groups"][0]["param_names"] == []
    assert split.expert_spec("b")["groups"][1]["param_names"] == ["weight", "bias"]
    local, per_stage = split.split_state(full)
    # stage parts as a StageBackend would keep them: load them into real backends, read them back
    backends = {name: StageBackend(name, m) for name, m in {"a": net.a, "b": net.b}.items()}
    for name, backend in backends.items():
        backend.configure_optimizer(0, split.expert_spec(name))
        backend.set_state({"optimizers": {0: per_stage[name]}})
    split.keep_local()
    opt.load_state_dict(local)
    merged = split.merge_state({n: b.get_state()["optimizers"][0] for n, b in backends.items()})
    assert merged["param_groups"] == full["param_groups"]
    assert merged["state"].keys() == full["state"].keys()
    for i in full["state"]:
        for k, v in full["state"][i].items():
            assert torch.equal(merged["state"][i][k], v), (i, k)
    split.restore()
    assert [len(g["params"]) for g in opt.param_groups] == [2, 3]


def test_lbfgs_is_refused_with_a_reason():
    net = _Net()
    with pytest.raises(ValueError, match="LBFGS"):
        OptimizerSplit.create(torch.optim.LBFGS(net.parameters()), 0, {"a": net.a})


def test_resolve_stages_refuses_tied_weights_and_duplicates():
    from lightning_distqat.swarm.stages import resolve_stages

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.embed.weight

    with pytest.raises(ValueError, match="tied weights"):
        resolve_stages(Tied(), ["embed"])
    with pytest.raises(ValueError, match="listed twice"):
        resolve_stages(_Net(), ["a", "a"])
    assert list(resolve_stages(_Net(), ["b", "a"])) == ["b", "a"]


def test_a_repeated_backward_is_answered_again_without_accumulating_twice():
    torch.manual_seed(0)
    backend = StageBackend("s", nn.Linear(4, 3))
    x = torch.randn(2, 4)
    layout, tensors = flatten_structure(((x,), {}))
    outputs, _ = backend.forward("r1", layout, tensors, training=True, need_grad=True)
    g = torch.ones_like(outputs[0])
    first = backend.backward("r1", [g])
    weight_grad = backend.module.weight.grad.clone()
    again = backend.backward("r1", [g])
    assert torch.equal(first[0], again[0])
    assert torch.equal(backend.module.weight.grad, weight_grad), "a repeated backward must not accumulate again"


def test_backward_with_too_few_output_grads_is_refused_before_anything_runs():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):  # noqa: ANN001, ANN201
            y = self.lin(x)
            return y, 2 * y

    backend = StageBackend("s", Two())
    layout, tensors = flatten_structure(((torch.randn(4, 3),), {}))
    outputs, _ = backend.forward("r", layout, tensors, training=True, need_grad=True)
    assert len(outputs) == 2
    with pytest.raises(StageError, match="backward got 1 output grads for 2 outputs"):
        backend.backward("r", [torch.ones(4, 2)])
    assert backend.module.lin.weight.grad is None, "nothing may be accumulated from a refused backward"
    backend.backward("r", [torch.ones(4, 2), torch.ones(4, 2)])  # the context survived the refused call
    assert backend.module.lin.weight.grad is not None


def test_the_strategy_leaves_the_callers_configs_alone():
    from lightning_distqat import DistqatStrategy, SwarmConfig

    swarm = SwarmConfig()
    strategy = DistqatStrategy(stages=["a"], swarm=swarm, experiment="other", initial_peers=["/ip4/1.2.3.4/tcp/1"])
    assert (swarm.experiment, swarm.initial_peers) == ("distqat", None)
    assert (strategy.swarm_config.experiment, strategy.swarm_config.initial_peers) == ("other", ["/ip4/1.2.3.4/tcp/1"])


def test_a_step_with_gradients_that_are_not_finite_is_skipped_and_says_so():
    backend = StageBackend("s", nn.Linear(3, 2))
    backend.configure_optimizer(0, {"cls": "torch.optim.SGD", "defaults": {"lr": 0.1},
                                    "groups": [{"param_names": ["weight", "bias"]}]})
    before = {k: v.clone() for k, v in backend.module.state_dict().items()}
    backend.module.weight.grad = torch.full_like(backend.module.weight, float("nan"))
    backend.module.bias.grad = torch.ones_like(backend.module.bias)
    reason = backend.step(0, [{"lr": 0.1, "momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False,
                               "maximize": False, "foreach": None, "differentiable": False, "fused": None}])
    assert reason is not None and "non-finite" in reason and "skipped" in reason
    assert all(torch.equal(v, before[k]) for k, v in backend.module.state_dict().items())
    assert backend.module.weight.grad is None, "the bad gradients are dropped"


def test_a_stage_prepared_for_qat_refuses_a_trainer_without_it():
    backend = StageBackend("s", nn.Sequential(nn.Linear(32, 32)))
    backend.prepare_qat(None, 0)  # no QAT asked, none applied: nothing to do
    backend.prepare_qat("int8-int4", 32)
    backend.prepare_qat("int8-int4", 32)  # the same again: fine
    for scheme, group_size in ((None, 0), ("int4-weight", 32), ("int8-int4", 16)):
        with pytest.raises(StageError, match="already prepared for QAT"):
            backend.prepare_qat(scheme, group_size)


def test_a_directory_subkey_is_one_owner_marker_and_nothing_else():
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils.serializer import MSGPackSerializer

    from lightning_distqat.swarm.records import OwnerSubkeyOnly, experts_key, local_owner_key

    validator = OwnerSubkeyOnly("exp")
    key = DHTID.generate(source=experts_key("exp")).to_bytes()
    other = DHTID.generate(source="something_else").to_bytes()

    def record(subkey, on=key):  # noqa: ANN001, ANN202
        return DHTRecord(on, MSGPackSerializer.dumps(subkey) if subkey is not None else None, b"v", 0.0)

    assert validator.validate(record(local_owner_key()))
    for bad in (local_owner_key() + b"-2", b"x" + local_owner_key(), local_owner_key() * 2, b"plain", "str", None):
        assert not validator.validate(record(bad)), bad
    assert validator.validate(record(b"anything", on=other)), "other keys are not this validator's business"


def _records(*specs):  # (peer, stage, leased)
    return [ExpertRecord(peer_id=p, stage=s, fingerprint="f", version=0, throughput=0.0, leased=leased)
            for p, s, leased in specs]


def test_a_new_expert_takes_the_stage_with_the_fewest_experts():
    from lightning_distqat.expert.placement import initial_stage

    stages = ["a", "b", "c"]
    assert initial_stage(stages, _records(("p1", "a", False), ("p2", "b", False)), "me") == "c"
    assert initial_stage(stages, _records(("p1", "a", False), ("p2", "b", True), ("p3", "c", False),
                                          ("p4", "c", False)), "me") in ("a", "b")
    spread = {initial_stage(stages, [], f"peer{i}") for i in range(30)}
    assert spread == set(stages), "servers starting together must not all pick one stage"


def test_exactly_one_expert_moves_to_a_gap_and_only_from_a_stage_that_can_spare_it():
    from lightning_distqat.expert.placement import planned_move

    stages = ["a", "b", "c"]
    directory = _records(("p1", "a", False), ("p2", "a", False), ("p3", "a", True), ("p4", "b", False))
    movers = [r.peer_id for r in directory if planned_move(stages, directory, r.peer_id) == "c"]
    assert len(movers) == 1 and movers[0] in ("p1", "p2"), movers  # never the leased one, never b's only one
    balanced = _records(("p1", "a", False), ("p2", "b", False), ("p3", "c", False), ("p4", "a", False))
    assert all(planned_move(stages, balanced, r.peer_id) is None for r in balanced)  # 2-1-1: nothing to gain
    stuck = _records(("p1", "a", True), ("p2", "a", True), ("p3", "b", False))  # only leased experts could move
    assert all(planned_move(stages, stuck, r.peer_id) is None for r in stuck)


def test_a_move_needs_a_lasting_gap_and_a_moved_expert_stays():
    from lightning_distqat.expert.placement import MovePolicy

    policy = MovePolicy(patience=3, min_stay=60.0)
    assert [policy.check("c", t) for t in (0, 1)] == [None, None]
    assert policy.check(None, 2) is None and policy.check("c", 3) is None  # the gap closed: counting starts again
    assert policy.check("c", 4) is None and policy.check("c", 5) == "c"
    policy.moved(5)
    assert [policy.check("a", t) for t in (6, 7, 8, 9)] == [None, None, None, None]  # it stays a while
    assert policy.check("a", 70) == "a"


def test_check_finite_finds_nan_and_inf_but_not_finite_values_whose_sum_overflows():
    from lightning_distqat.expert.checks import check_finite

    big = torch.full((1000,), 3e38)  # finite, but its sum is inf: the fast path must fall back, not refuse
    half = torch.full((10,), 60000.0, dtype=torch.float16)  # sums past fp16's range
    check_finite([big, half, torch.zeros(0), torch.arange(3)], "x")
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.ones(4, dtype=torch.float64)
        t[2] = bad
        with pytest.raises(ValueError, match=r"x #1 holds"):
            check_finite([torch.ones(3), t], "x")


def test_split_batch_cuts_every_tensor_of_the_batch_dimension_and_keeps_the_rest():
    from collections import namedtuple

    from lightning_distqat.swarm.overlap import split_batch

    Pair = namedtuple("Pair", "x y")
    batch = {"pair": Pair(torch.arange(10).view(5, 2), torch.arange(5)), "ids": [torch.arange(5)],
             "vocab": torch.zeros(3), "name": "digits"}
    parts = split_batch(batch, 2)
    assert [n for _, n in parts] == [2, 3] or [n for _, n in parts] == [3, 2]
    assert sum(n for _, n in parts) == 5
    first, n = parts[0]
    assert isinstance(first["pair"], Pair) and first["pair"].x.shape == (n, 2) and first["ids"][0].shape == (n,)
    assert first["vocab"].shape == (3,) and first["name"] == "digits"  # not of the batch dimension: whole, to each
    assert torch.equal(torch.cat([p["pair"].y for p, _ in parts]), torch.arange(5))
    assert [n for _, n in split_batch((torch.ones(2, 4),), 4)] == [1, 1]  # never more parts than rows
    assert split_batch({"name": "x"}, 2) is None and split_batch(torch.ones(0, 3), 2) is None


def test_joined_micro_losses_give_the_whole_batch_gradient():
    from lightning_distqat.swarm.overlap import JoinMicroLosses, MicroBatches, split_batch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(11, 8), torch.randint(0, 3, (11,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    runner = MicroBatches(3)
    try:
        parts = split_batch((x, y), 3)
        losses = runner.run(lambda part: torch.nn.functional.cross_entropy(model(part[0][0]), part[0][1]), parts)
        joined = JoinMicroLosses.apply(torch.empty(0, requires_grad=True), runner, [n / 11 for _, n in parts], losses)
        (joined * 0.5).backward()  # a scaled loss (Lightning's accumulation) scales every micro-batch's share
    finally:
        runner.close()
    for p, g in zip(model.parameters(), whole):
        torch.testing.assert_close(p.grad, 0.5 * g, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(joined, torch.nn.functional.cross_entropy(model(x), y), rtol=1e-5, atol=1e-7)


def test_micro_batches_overlap_only_their_waits():
    import threading
    import time

    from lightning_distqat.swarm.overlap import MicroBatches, waiting

    inside, most, lock = [0], [0], threading.Lock()

    def step(part):  # noqa: ANN001, ANN202
        for _ in range(3):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.01)  # Python work: holds the baton
            with lock:
                inside[0] -= 1
            with waiting():  # an expert's answer: the others run meanwhile
                time.sleep(0.2)
        return part * 2

    runner = MicroBatches(4)
    try:
        started = time.monotonic()
        assert runner.run(step, [1, 2, 3, 4]) == [2, 4, 6, 8]
        took = time.monotonic() - started
        with pytest.raises(ZeroDivisionError):
            runner.run(lambda part: 1 / part, [1, 0, 2])
    finally:
        runner.close()
    assert most[0] == 1, "two micro-batches ran Python at once"
    assert took < 4 * 3 * 0.2 * 0.6, f"the waits did not overlap ({took:.2f} s)"


def test_an_answer_slot_of_a_cancelled_call_is_freed_once_the_worker_is_done_with_it():
    """The caller of a call goes away while the expert's worker writes the answer into a shared-memory slot: the
    slot is released, but only after the worker finished writing (never while it may still write)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from lightning_distqat.expert.servicer import ExpertServicer

    writing, proceed, finished, released = threading.Event(), threading.Event(), threading.Event(), []

    def write() -> str:
        writing.set()
        assert proceed.wait(5)  # still writing until the test says so
        finished.set()
        return "slot"

    async def run() -> None:
        freed = asyncio.Event()

        def release(result: str) -> None:  # on the loop, from the worker job's done callback
            released.append((result, finished.is_set()))
            freed.set()

        with ThreadPoolExecutor(1) as worker:
            servicer = SimpleNamespace(_worker=worker)
            call = asyncio.create_task(ExpertServicer._run_holding(servicer, write, release))
            await asyncio.get_running_loop().run_in_executor(None, writing.wait, 5)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert released == []  # the worker is still writing
            proceed.set()
            await asyncio.wait_for(freed.wait(), 5)
        assert released == [("slot", True)]
        # and a call that is not cancelled gets its result, nothing released
        with ThreadPoolExecutor(1) as worker:
            assert await ExpertServicer._run_holding(SimpleNamespace(_worker=worker), lambda: "mine",
                                                     released.append) == "mine"
        assert released == [("slot", True)]

    asyncio.run(run())


def test_a_replica_is_alive_if_any_signed_record_says_so():
    """Heartbeats of DiLoCo replicas (``diloco/presence.py``): the peer id follows the owner marker in the subkey;
    a "left" record cannot hide a live heartbeat; records without a marker, with more than a marker and a base58
    peer id, or with a bad value are ignored."""
    from types import SimpleNamespace as NS

    from lightning_distqat.diloco.presence import live_peers

    def found(*records):
        return NS(value={subkey: NS(value=value) for subkey, value in records})

    assert live_peers(None) is None and live_peers(NS(value="junk")) is None
    alive = found((b"[owner:KEY1]peerA", {"alive": True}), (b"[owner:KEY2]peerB", {"alive": False}),
                  (b"[owner:KEY3]peerB", {"alive": True}), (b"peerC", {"alive": True}),
                  (b"[owner:KEY4]peerD", {"alive": 1}), (b"[owner:KEY5]peerE", "yes"),
                  ("[owner:KEY6]peerF", {"alive": True}), (b"[owner:KEY7]", {"alive": True}),
                  (b"[owner:KEY8][owner:KEY9]peerG", {"alive": True}), (b"[owner:KEY8]peer0", {"alive": True}),
                  (b"[owner:KEY8]" + b"z" * 129, {"alive": True}))
    assert live_peers(alive) == {"peerA", "peerB"}
    assert live_peers(found((b"[owner:KEY2]peerB", {"alive": False}))) == set()


def test_a_replica_is_deserted_only_when_partners_it_saw_are_gone_for_the_grace_time():
    from types import SimpleNamespace as NS

    from lightning_distqat.diloco import presence as module
    from lightning_distqat.diloco.presence import Presence

    class Done:  # what DHT.get(..., return_future=True) returns
        def __init__(self, value):
            self.value = value

        def result(self, timeout=None):
            if isinstance(self.value, Exception):
                raise self.value
            return self.value

    class DHT:
        def __init__(self):
            self.records = {}

        def get(self, key, latest, return_future):
            return Done(NS(value={b"[owner:K]" + p.encode(): NS(value={"alive": a}) for p, a in self.records.items()}))

    clock = [100.0]
    dht = DHT()
    presence = Presence(dht, "t_x_diloco", "me", period=1.0, grace=10.0)
    original = module.time.monotonic
    module.time.monotonic = lambda: clock[0]
    try:
        dht.records = {"me": True}
        presence.refresh()
        clock[0] += 60
        assert not presence.deserted(), "nobody seen yet: a partner may be starting"
        dht.records = {"me": True, "other": True}
        assert presence.refresh() == {"other"} and not presence.deserted()
        dht.records = {"me": True, "other": False}
        assert presence.refresh() == set() and not presence.deserted(), "gone, but not for the grace time yet"
        clock[0] += 9
        presence.refresh()
        assert not presence.deserted()
        clock[0] += 2
        dht.records = {"other": False}
        assert presence.refresh() is None, "its own heartbeat missing: the lookup was incomplete"
        assert presence.deserted(), "an incomplete lookup changes nothing that was seen before"
        dht.records = {"me": True, "spare": True}
        presence.refresh()
        assert not presence.deserted(), "a replacement came"
        dht.get = lambda key, latest, return_future: Done(TimeoutError("no DHT"))
        assert presence.refresh() is None and not presence.deserted()
    finally:
        module.time.monotonic = original
