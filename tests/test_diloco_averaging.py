"""DiLoCo rounds over real hivemind averaging on loopback: replicas agree after every round, a replica that does not
show up is left out without blocking the others, a late joiner starts from the current outer state, and a broken or
hostile replica cannot pull the honest ones away from their own average."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from lightning_distqat.diloco.config import DiLoCoConfig
from lightning_distqat.diloco.sync import GONE, DiLoCoSync
from lightning_distqat.swarm.dht import start_dht

pytestmark = [pytest.mark.swarm]
CFG = DiLoCoConfig(inner_steps=3, matchmaking_time=2.0, averaging_timeout=15.0)


def _inner_steps(model: nn.Module, opt: torch.optim.Optimizer, seed: int, steps: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 5, generator=g), torch.randn(8, 2, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _in_parallel(*fns):
    results, errors = [None] * len(fns), []

    def run(i, fn):
        try:
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below in the test thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a round did not finish within 60s"
    return results


@pytest.fixture
def two_nodes():
    first = start_dht()
    second = start_dht([str(m) for m in first.get_visible_maddrs()])
    third = start_dht([str(m) for m in first.get_visible_maddrs()])
    syncs: list[DiLoCoSync] = []
    try:
        yield (first, second, third), syncs
    finally:
        for sync in syncs:
            sync.shutdown()
        for node in (third, second, first):
            node.shutdown()


def _started_pair(two_nodes, prefix: str, averaging_timeout: float) -> list[tuple[DiLoCoSync, nn.Module]]:
    """Two started replicas of one ``nn.Linear(5, 2)`` each (rounds of 1 inner step, matchmaking 1 s)."""
    nodes, syncs = two_nodes
    cfg = DiLoCoConfig(inner_steps=1, matchmaking_time=1.0, averaging_timeout=averaging_timeout)
    pair = []
    for dht in nodes[:2]:
        model = nn.Linear(5, 2)
        sync = DiLoCoSync(list(model.parameters()), cfg, dht=dht, prefix=prefix)
        syncs.append(sync)
        sync.start()  # one after the other (see below)
        pair.append((sync, model))
    return pair


def test_replicas_agree_after_every_round_and_late_joiner_catches_up(two_nodes):
    (dht_a, dht_b, dht_c), syncs = two_nodes
    torch.manual_seed(0)
    base = nn.Linear(5, 2)
    models = [copy.deepcopy(base) for _ in range(3)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    a = DiLoCoSync(list(models[0].parameters()), CFG, dht=dht_a, prefix="t_s_diloco")
    b = DiLoCoSync(list(models[1].parameters()), CFG, dht=dht_b, prefix="t_s_diloco")
    syncs += [a, b]
    a.start()  # one after the other: real replicas are separate processes, and forking from two threads at once
    b.start()  # is unsafe

    for r in range(2):
        pseudo = {}
        reference = copy.deepcopy(a.state)  # the outer step that a's replica should take, computed by hand below

        def go(sync, model, opt, seed, weight):
            _inner_steps(model, opt, seed, CFG.inner_steps)
            pseudo[weight] = sync.state.pseudo_gradients()
            return sync.round(samples=weight)

        outer_before = [o.detach().clone() for o in a.state.outer]
        reports = _in_parallel(lambda: go(a, models[0], opts[0], 10 + r, 24),
                               lambda: go(b, models[1], opts[1], 20 + r, 8))
        assert [rep.group_size for rep in reports] == [2, 2], reports
        assert all(rep.bytes_sent > 0 for rep in reports)
        # every replica aggregates the same contributions in the same order: they agree bit for bit
        for oa, ob in zip(a.state.outer, b.state.outer):
            assert torch.equal(oa, ob), "replicas differ after a round"
        for pa, pb in zip(models[0].parameters(), models[1].parameters()):
            assert torch.equal(pa, pb)
        assert a.state.round == b.state.round == r + 1
        assert not all(torch.equal(x, y) for x, y in zip(outer_before, a.state.outer)), "the outer step did nothing"
        reference.apply([(24 * pa + 8 * pb) / 32 for pa, pb in zip(pseudo[24], pseudo[8])])  # weighted by samples
        for got, want in zip(a.state.outer, reference.outer):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), "the round is not the samples-weighted average"

    # a replica that starts late adopts the current outer state
    c = DiLoCoSync(list(models[2].parameters()), CFG, dht=dht_c, prefix="t_s_diloco")
    syncs.append(c)
    c.start()
    assert c.state.round == 2
    for pc, pa in zip(models[2].parameters(), models[0].parameters()):
        assert torch.allclose(pc, pa, rtol=1e-6, atol=1e-8)


def test_absent_replica_is_left_out_and_the_round_goes_on(two_nodes):
    (a, model_a), (b, model_b) = _started_pair(two_nodes, "t_x_diloco", averaging_timeout=4.0)
    _inner_steps(model_a, torch.optim.SGD(model_a.parameters(), lr=0.1), 1, 2)
    expected = [o.detach() - p.detach() for o, p in zip(a.state.outer, model_a.parameters())]
    report = a.round(samples=16)  # b never shows up for this round
    assert report.group_size == 1 and report.round == 1
    assert a.state.round == 1 and b.state.round == 0
    assert all(torch.isfinite(p).all() for p in model_a.parameters())
    assert any(g.abs().sum() > 0 for g in expected)

    # b is a round behind (it missed round 1). In the next round it contributes, but applying the group's aggregate
    # to its round-0 outer state would leave it apart from a: it adopts a's round 2 instead. Then b listens (as a
    # replacement does in its first round) with an outer state that differs from a's at the same round: same again.
    for r, listening in ((2, False), (3, True)):
        if listening:
            with torch.no_grad():
                b.state.outer[0].add_(0.5)
            b.listen_next_round = True
        _inner_steps(model_a, torch.optim.SGD(model_a.parameters(), lr=0.1), 2 * r, 2)
        reports = _in_parallel(lambda: a.round(samples=16), lambda: b.round(samples=16))
        assert [rep.group_size for rep in reports] == [2, 2], reports
        assert a.state.round == b.state.round == r
        assert a.state.digest() == b.state.digest(), f"round {r}: the replicas differ"
        for pa, pb in zip(model_a.parameters(), model_b.parameters()):
            assert torch.equal(pa, pb)


def test_a_replica_whose_partners_left_steps_alone_without_waiting(two_nodes):
    """Heartbeats (``diloco/presence.py``): once every replica this one saw has left (or its heartbeat stopped) for
    half the ``averaging_timeout`` (the grace time for a replacement), a round still looking for a group gives up
    and applies its own pseudo-gradient, instead of failing at ``averaging_timeout``; the next one does at once."""
    (a, model_a), (b, model_b) = _started_pair(two_nodes, "t_p_diloco", averaging_timeout=12.0)
    reports = _in_parallel(lambda: a.round(samples=16), lambda: b.round(samples=16))
    assert [r.group_size for r in reports] == [2, 2] and reports[0].failed is None, reports
    b.shutdown()  # says it left
    _inner_steps(model_a, torch.optim.SGD(model_a.parameters(), lr=0.1), 1, 2)
    expected = [o.detach() - p.detach() for o, p in zip(a.state.outer, model_a.parameters())]
    outer = [o.detach().clone() for o in a.state.outer]
    report = a.round(samples=16)
    assert report.group_size == 1 and report.round == 2, report
    assert report.failed is not None and GONE in report.failed, report
    # its own outer step: plain SGD with outer_lr (the default outer optimizer is Nesterov; only check direction)
    moved = [n.detach() - o for n, o in zip(a.state.outer, outer)]
    assert all(torch.isfinite(m).all() for m in moved) and any(m.abs().sum() > 0 for m in moved)
    assert sum(float((m * e).sum()) for m, e in zip(moved, expected)) < 0, "the outer step goes along -pseudo-grad"
    later = a.round(samples=16)
    assert later.round == 3 and later.failed.startswith(f"{GONE} (their heartbeats stopped)"), later


def test_int8_pseudo_gradients_quarter_the_bytes_and_agree_with_fp32(two_nodes):
    """The same round twice from the same start, with fp32 and with int8 pseudo-gradients (fp32 accumulation)."""
    (dht_a, dht_b, _), syncs = two_nodes
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 256), nn.Linear(256, 2))
    results = {}
    for codec in ("none", "int8"):
        models = [copy.deepcopy(base) for _ in range(2)]
        cfg = DiLoCoConfig(inner_steps=2, matchmaking_time=2.0, averaging_timeout=15.0, pseudo_gradient_codec=codec)
        pair = [DiLoCoSync(list(m.parameters()), cfg, dht=d, prefix=f"t_q_{codec}") for m, d in
                zip(models, (dht_a, dht_b))]
        syncs += pair
        for s in pair:
            s.start()

        def go(sync, model, seed):
            _inner_steps(model, torch.optim.SGD(model.parameters(), lr=0.05), seed, 2)
            return sync.round(samples=8)

        reports = _in_parallel(lambda: go(pair[0], models[0], 1), lambda: go(pair[1], models[1], 2))
        assert [r.group_size for r in reports] == [2, 2]
        results[codec] = ([o.detach().clone() for o in pair[0].state.outer], [o.detach().clone() for o in
                          pair[1].state.outer], sum(r.bytes_sent for r in reports))
    ratio = results["int8"][2] / results["none"][2]
    assert ratio <= 0.3, f"int8 pseudo-gradients sent {ratio:.3f} x the fp32 bytes"
    start = torch.cat([p.detach().reshape(-1) for p in base.parameters()])
    exact = torch.cat([o.reshape(-1) for o in results["none"][0]])
    for replica in (0, 1):
        approx = torch.cat([o.reshape(-1) for o in results["int8"][replica]])
        step = (exact - start).norm()
        assert (approx - exact).norm() <= 0.02 * step, "int8 averaging moved the outer params off the fp32 result"


@pytest.mark.parametrize("attack", ["nan", "huge", "weight"])
def test_one_hostile_replica_of_three_cannot_move_the_honest_ones(two_nodes, attack):
    """The third replica sends NaN, values of 1e30, or claims 1e30 samples. The honest two end the round finite and
    within 1e-3 (relative) of the round they would have had without it, and say whom they left out."""
    nodes, syncs = two_nodes
    torch.manual_seed(0)
    base = nn.Linear(5, 2)
    models = [copy.deepcopy(base) for _ in range(3)]
    cfg = DiLoCoConfig(inner_steps=2, matchmaking_time=2.0, averaging_timeout=15.0)
    trio = [DiLoCoSync(list(m.parameters()), cfg, dht=d, prefix=f"t_attack_{attack}") for m, d in zip(models, nodes)]
    syncs += trio
    for sync in trio:
        sync.start()
    for i in range(3):
        _inner_steps(models[i], torch.optim.SGD(models[i].parameters(), lr=0.05), 40 + i, 2)
    honest_only = copy.deepcopy(trio[0].state)
    pseudo = [s.state.pseudo_gradients() for s in trio[:2]]
    honest_only.apply([(16 * a + 8 * b) / 24 for a, b in zip(pseudo[0], pseudo[1])])
    with torch.no_grad():
        for p in models[2].parameters():
            if attack == "nan":
                p.fill_(float("nan"))
            elif attack == "huge":
                p.fill_(-1e30)
    hostile_samples = 1e30 if attack == "weight" else 8

    reports = _in_parallel(lambda: trio[0].round(samples=16), lambda: trio[1].round(samples=8),
                           lambda: trio[2].round(samples=hostile_samples))
    for report, sync in zip(reports[:2], trio[:2]):
        assert report.group_size == 2, report
        assert list(report.excluded) == [trio[2]._averager.peer_id.to_base58()], report.excluded
        for got, want in zip(sync.state.outer, honest_only.outer):
            assert torch.isfinite(got).all()
            assert float((got - want).detach().norm()) <= 1e-3 * float(want.detach().norm()), (attack, got, want)
