"""What crosses the wire through a RemoteStage, on real experts (one swarm for the whole module): nested structures
of tensors and plain values both ways, a lost answer retried without double counting, non-finite values meeting a
lossy codec, and leases that renew and expire."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from torch import nn

from lightning_distqat import ExpertError, SwarmConfig
from lightning_distqat.config import ExpertConfig
from lightning_distqat.quant.codecs import QuantizationError
from lightning_distqat.swarm import remote
from lightning_distqat.swarm import session as session_module
from lightning_distqat.swarm.client import SwarmClient
from lightning_distqat.swarm.embedded import EmbeddedSwarm
from lightning_distqat.swarm.records import stage_fingerprint
from lightning_distqat.swarm.remote import RemoteStage

pytestmark = [pytest.mark.swarm]


class Nested(nn.Module):
    """Takes a nested tuple, a dict holding a list, keyword tensors and plain values; returns a dict of tensors,
    a list with a tuple inside, an int and a str."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(4, 4)

    def forward(self, pair, extra, index, *, scale=1.0, mode="add", mask=None):  # noqa: ANN001, ANN201
        a, (b, c) = pair
        x = self.w(a) + b * c
        if mode == "add":
            x = x + extra["bias"][0]
        if mask is not None:
            x = x * mask
        return {"out": x * scale, "parts": [a.sum(-1)[index], (b * 2,)], "count": 3, "label": mode}


class Log(nn.Module):
    def forward(self, x):  # noqa: ANN001, ANN201
        return torch.log(x)


STAGES = {"nested": Nested(), "lin": nn.Linear(3, 2), "log": Log(), "free": nn.Linear(2, 2)}


@pytest.fixture(scope="module")
def swarm():
    """Real expert processes for every stage of STAGES and a client holding all but ``free``."""
    torch.manual_seed(0)
    client = SwarmClient(SwarmConfig(experiment="calls", request_timeout=30, discovery_timeout=60, lease_ttl=30))
    experts = EmbeddedSwarm(STAGES, expert_config=ExpertConfig(experiment="calls"))
    try:
        experts.launch()
        client.start()
        experts.start(client.visible_maddrs)
        held = {s: m for s, m in STAGES.items() if s != "free"}
        handles = client.claim_pipeline({s: stage_fingerprint(m) for s, m in held.items()})
        for stage, handle in handles.items():
            handle.set_state({"module": held[stage].state_dict()})
        yield client, handles
    finally:
        client.shutdown()
        experts.shutdown()


def test_nested_structures_keywords_and_plain_values_go_both_ways(swarm):
    _, handles = swarm
    local = copy.deepcopy(STAGES["nested"])
    proxy = RemoteStage("nested", handles)

    def call(module):
        torch.manual_seed(1)
        a, b, c = (torch.randn(2, 4, requires_grad=True) for _ in range(3))
        mask = torch.rand(2, 4)
        out = module((a, (b, c)), {"bias": [torch.randn(4)]}, torch.tensor([1, 0]), scale=0.5, mode="add", mask=mask)
        loss = out["out"].pow(2).sum() + out["parts"][0].sum() + out["parts"][1][0].sum()
        loss.backward()
        return out, (a.grad, b.grad, c.grad)

    remote_out, remote_grads = call(proxy)
    local_out, local_grads = call(local)
    assert remote_out["count"] == 3 and remote_out["label"] == "add"
    assert isinstance(remote_out["parts"], list) and isinstance(remote_out["parts"][1], tuple)
    for got, want in [(remote_out["out"], local_out["out"]), (remote_out["parts"][0], local_out["parts"][0]),
                      (remote_out["parts"][1][0], local_out["parts"][1][0]), *zip(remote_grads, local_grads)]:
        assert torch.allclose(got, want, atol=1e-6), (got, want)
    local_norm = torch.nn.utils.get_total_norm([p.grad for p in local.parameters()])
    assert handles["nested"].grad_norm(2.0) == pytest.approx(float(local_norm), rel=1e-5)


def test_what_cannot_cross_the_wire_is_named(swarm):
    _, handles = swarm
    with pytest.raises(TypeError, match=r"RemoteStage 'nested': the call\[0\]\[1\] is a object"):
        RemoteStage("nested", handles)(torch.ones(1), object(), torch.tensor([0]))
    with pytest.raises(TypeError, match=r"has a dict key 1 \(int\); only str keys travel"):
        RemoteStage("nested", handles)(torch.ones(1), {1: torch.ones(1)}, torch.tensor([0]))


@pytest.mark.parametrize("sessions", [True, False], ids=["session", "stream-per-call"])
def test_a_lost_answer_is_retried_without_counting_twice(swarm, monkeypatch, sessions):
    """The answer of the first forward and of the first backward is lost on the way (the call's P2P stream ends
    without it, as a reset stream does; or the session stream breaks: its calls in flight get no answer); the
    trainer asks again (on a new session), the expert answers again, and its gradients are accumulated once."""
    _, handles = swarm
    handle = handles["lin"]
    handle.sessions = sessions
    handle.set_state({"module": STAGES["lin"].state_dict()})
    handle.configure({0: {"cls": "torch.optim.sgd.SGD", "defaults": {"lr": 0.0},
                          "groups": [{"lr": 0.0, "param_names": ["weight", "bias"]}]}})
    handle.step(0, [{"lr": 0.0}])  # no gradients left from the other variant
    local = copy.deepcopy(STAGES["lin"])
    calls: list[int] = []
    if sessions:
        real_unpack = session_module.unpack

        def lose_first_answers(messages, shared=None):  # noqa: ANN001, ANN202
            calls.append(1)
            answer = real_unpack(messages, shared)  # the expert did answer; the answer is lost on the way
            return (None, []) if len(calls) in (1, 3) else answer

        monkeypatch.setattr(session_module, "unpack", lose_first_answers)
    else:
        real = remote.unpack_stream

        async def lose_first_answers(stream, shared=None):  # noqa: ANN001, ANN202
            calls.append(1)
            answer = await real(stream, shared)
            return (None, []) if len(calls) in (1, 3) else answer

        monkeypatch.setattr(remote, "unpack_stream", lose_first_answers)
    opened = handle.sessions_opened
    x = torch.randn(5, 3, requires_grad=True)
    out = RemoteStage("lin", handles)(x)
    out.sum().backward()
    assert len(calls) == 4, "the forward and the backward were each sent twice"
    assert handle.sessions_opened - opened == (2 if sessions else 0)  # each lost answer broke its session
    x_local = x.detach().clone().requires_grad_(True)
    local(x_local).sum().backward()
    assert torch.allclose(out, local(x_local.detach()), atol=1e-6)
    assert torch.allclose(x.grad, x_local.grad, atol=1e-6)
    local_norm = torch.nn.utils.get_total_norm([p.grad for p in local.parameters()])
    monkeypatch.undo()
    assert handle.grad_norm(2.0) == pytest.approx(float(local_norm), rel=1e-5), "gradients accumulated twice"
    handle.sessions = True


def test_non_finite_values_and_a_lossy_codec(swarm):
    """NaN never travels through a lossy codec: the trainer refuses to send it, the expert refuses to answer with
    it (naming its output), and the expert goes on serving."""
    _, handles = swarm
    handle = handles["log"]
    handle.activations = handle.gradients = ("int8", 256)
    try:
        proxy = RemoteStage("log", handles)
        with pytest.raises(QuantizationError, match=r"stage 'log' input #0: 1 non-finite value"):
            proxy(torch.tensor([1.0, float("nan")]))
        with pytest.raises(ExpertError, match=r"stage 'log' output #0: 1 non-finite value.*stage 'log', expert"):
            proxy(torch.tensor([1.0, -1.0]))  # log(-1) is NaN on the expert
        x = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
        y = proxy(x)
        assert torch.allclose(y, torch.log(x.detach()), atol=3e-2), "the expert kept serving"  # int8 both ways
        with pytest.raises(QuantizationError, match=r"gradient of stage 'log' output #0: 1 non-finite"):
            y.backward(torch.tensor([1.0, float("inf"), 1.0]))
    finally:
        handle.activations = handle.gradients = ("none", 0)


def test_leases_are_renewed_and_expire(swarm):
    """A trainer's lease outlives its ttl while its client renews it; an unrenewed lease expires and the expert
    goes to the next trainer."""
    client, _ = swarm
    fingerprint = {"free": stage_fingerprint(STAGES["free"])}
    ttl = 2.0
    holder = SwarmClient(SwarmConfig(experiment="calls", initial_peers=client.visible_maddrs, lease_ttl=ttl,
                                     discovery_timeout=30))
    try:
        holder.start()
        held = holder.claim_pipeline(fingerprint)["free"]
        other = client.handle("free", held.peer_id)
        threading.Event().wait(2.5 * ttl)  # the behaviour under test is time itself: outlive the ttl
        assert other.claim(ttl=ttl)["granted"] is False, "the renewed lease should still be held"

        holder._renew_stop.set()  # the holder stops renewing, as a trainer that died would
        holder._renewer.join(10)
        deadline, reply = time.monotonic() + 3 * ttl, {}
        while time.monotonic() < deadline and not reply.get("granted"):
            reply = other.claim(ttl=ttl)
            threading.Event().wait(0.2)
        assert reply["granted"] is True and reply["stage"] == "free", "an unrenewed lease must expire"
        other.release()
    finally:
        holder.held = {}  # released above, or expired
        holder.shutdown()
