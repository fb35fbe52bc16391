"""The robust aggregate of DiLoCo rounds (diloco/aggregate.py): pure math, no network."""

from __future__ import annotations

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_distqat.diloco.aggregate import Contribution, robust_aggregate


def _c(peer: str, weight: float, vector: torch.Tensor) -> Contribution:
    return Contribution(peer, weight, [vector[:3].reshape(3).clone(), vector[3:].reshape(-1, 1).clone()])


def _vec(result) -> torch.Tensor:  # noqa: ANN001
    return torch.cat([t.reshape(-1) for t in result.tensors]).double()


def _honest(n: int = 3, dim: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(dim, generator=g, dtype=torch.float64)
    return [base + 0.1 * torch.randn(dim, generator=g, dtype=torch.float64) for _ in range(n)]


def _mean(points: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float64)
    return (w[:, None] * torch.stack(points)).sum(0) / w.sum()


def test_replicas_that_agree_average_exactly_and_identically():
    points = _honest(3)
    weights = [3.0, 1.0, 2.0]
    contributions = [_c(f"p{i}", w, v) for i, (v, w) in enumerate(zip(points, weights))]
    result = robust_aggregate(contributions)
    assert result.used == ["p0", "p1", "p2"] and not result.excluded
    torch.testing.assert_close(_vec(result), _mean(points, weights), rtol=0, atol=1e-15)
    again = robust_aggregate([_c(c.peer, c.weight, torch.cat([t.reshape(-1) for t in c.tensors]))
                              for c in contributions])
    assert torch.equal(_vec(again), _vec(result)), "every replica must compute the same aggregate"


def test_broken_contributions_are_left_out():
    points = _honest(3)
    honest_only = _mean(points[:2], [1.0, 1.0])
    for bad_vector, bad_weight, why in [
        (torch.full((8,), float("nan"), dtype=torch.float64), 1.0, "not finite"),
        (torch.full((8,), -1e30, dtype=torch.float64), 1.0, "norm above"),
        (points[2], 1e30, "weight"),
        (points[2], float("inf"), "weight"),
        (points[2], -1.0, "weight"),
    ]:
        result = robust_aggregate([_c("a", 1.0, points[0]), _c("b", 1.0, points[1]), _c("x", bad_weight, bad_vector)])
        assert result.used == ["a", "b"] and why in result.excluded["x"], (why, result.excluded)
        torch.testing.assert_close(_vec(result), honest_only, rtol=1e-12, atol=0)


def test_an_attacker_within_the_screening_limits_moves_the_result_at_most_the_clip_radius():
    """Nine times the honest norm in the opposite direction, claiming 99 times the work (inside loose limits)."""
    a, b = _honest(2, seed=1)
    attacker = -9.0 * (a + b) / 2
    contributions = [_c("a", 1.0, a), _c("b", 1.0, b), _c("x", 99.0, attacker)]
    result = robust_aggregate(contributions, max_norm_ratio=10.0, max_weight_ratio=100.0, clip_factor=4.0)
    assert result.used == ["a", "b", "x"]
    honest = (a + b) / 2
    plain = _mean([a, b, attacker], [1.0, 1.0, 99.0])
    assert float((plain - honest).norm()) > 5 * float(honest.norm()), "the unclipped mean would be the attacker's"
    bound = 5.0 * float((a - b).norm())  # distance to the box of the honest points plus clip_factor of it
    assert float((_vec(result) - honest).norm()) <= bound


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=8, max_size=8),
       st.floats(1e-6, 1e12), st.integers(0, 2**16), st.floats(0.01, 10.0))
def test_one_bad_replica_of_three_stays_bounded_whatever_it_sends(bad, bad_weight, seed, spread):
    """With two honest replicas a and b, the result lies within (1 + clip_factor) x |a - b| of their mean, whatever
    finite vector and weight the third one claims (with the screening limits loosened to their maximum)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(8, generator=g, dtype=torch.float64)
    a = base + spread * torch.randn(8, generator=g, dtype=torch.float64)
    b = base + spread * torch.randn(8, generator=g, dtype=torch.float64)
    x = torch.tensor(bad, dtype=torch.float64)
    result = robust_aggregate([_c("a", 1.0, a), _c("b", 1.0, b), _c("x", bad_weight, x)],
                              max_norm_ratio=1e300, max_weight_ratio=1e300, clip_factor=4.0)
    honest = (a + b) / 2
    assert float((_vec(result) - honest).norm()) <= 5.0 * float((a - b).norm()) * (1 + 1e-9) + 1e-9


def test_a_pair_caps_the_larger_and_the_heavier_alike_on_both_sides():
    """Two replicas must end with the same params: what each computes does not depend on who computes it."""
    own, other = _honest(2, seed=2)
    ok = robust_aggregate([_c("me", 2.0, own), _c("you", 1.0, other)])
    torch.testing.assert_close(_vec(ok), _mean([own, other], [2.0, 1.0]), rtol=0, atol=1e-15)
    assert not ok.clipped and not ok.excluded
    for pair in ([_c("me", 1.0, own), _c("you", 101.0, 5.0 * own)], [_c("you", 101.0, 5.0 * own), _c("me", 1.0, own)]):
        result = robust_aggregate(pair)
        assert result.used == ["me", "you"] and "weight capped" in result.clipped["you"]
        assert "norm scaled down" in result.clipped["you"]
        torch.testing.assert_close(_vec(result), _mean([own, 4.0 * own], [1.0, 100.0]), rtol=1e-12, atol=0)
    listener = robust_aggregate([_c("me", 0.0, own), _c("you", 3.0, other)])
    assert listener.used == ["you"] and listener.listening == ["me"]
    torch.testing.assert_close(_vec(listener), other, rtol=0, atol=0)


def test_a_peers_outer_state_is_checked_and_keeps_our_hyperparameters():
    from types import SimpleNamespace

    from lightning_distqat.diloco.config import DiLoCoConfig
    from lightning_distqat.diloco.outer import OuterState
    from lightning_distqat.diloco.sync import DiLoCoSync

    config = DiLoCoConfig(outer_lr=0.7, outer_momentum=0.9)
    ours = OuterState([torch.ones(4), torch.ones(2, 2)], config)
    theirs = OuterState([torch.ones(4) * 1.1, torch.ones(2, 2)], DiLoCoConfig(outer_lr=0.5, outer_momentum=0.5))
    theirs.apply([torch.full((4,), 1e-3), torch.zeros(2, 2)])  # creates the momentum buffers, round 1
    good = theirs.state_dict()
    me = SimpleNamespace(state=ours, config=config)
    DiLoCoSync._check_peer_state(me, good)
    ours.load_state_dict(good)
    assert ours.round == 1 and torch.equal(ours.outer[0].detach(), theirs.outer[0].detach())
    assert ours.optimizer.param_groups[0]["lr"] == 0.7 and ours.optimizer.param_groups[0]["momentum"] == 0.9

    def broken(**change):  # noqa: ANN003, ANN202
        state = copy.deepcopy(theirs.state_dict())
        for key, value in change.items():
            if key == "momentum":
                state["optimizer"]["state"][0]["momentum_buffer"] = value
            else:
                state[key] = value
        return state

    for state, why in [
        (broken(round=-1), "round"), (broken(round=2**40), "round"), (broken(round=1.5), "round"),
        (broken(outer=[torch.full((4,), float("nan")), torch.ones(2, 2)]), "not finite"),
        (broken(outer=[torch.full((4,), 1e6), torch.ones(2, 2)]), "max_state_distance"),
        (broken(momentum=torch.full((4,), float("inf"))), "not finite"),
        (broken(momentum=torch.full((4,), 1e6)), "larger than"),
        (broken(optimizer="x"), "optimizer state"),
        (broken(outer=[torch.zeros(3), torch.ones(2, 2)]), "do not match"),
        ("x", "not an outer state"),
    ]:
        try:
            DiLoCoSync._check_peer_state(me, state)
        except ValueError as e:
            assert why in str(e), (why, e)
        else:
            raise AssertionError(f"a peer state with {why} was accepted")


def test_a_replica_behind_its_group_or_a_listener_that_differs_adopts_the_groups_round():
    from lightning_distqat.diloco.config import DiLoCoConfig
    from lightning_distqat.diloco.outer import OuterState
    from lightning_distqat.diloco.sync import catch_up_round

    config = DiLoCoConfig()
    a, b = OuterState([torch.ones(3)], config), OuterState([torch.ones(3)], config)
    assert a.digest() == b.digest()
    a.apply([torch.full((3,), 0.1)])
    assert a.digest() != b.digest()
    b.apply([torch.full((3,), 0.1)])
    assert a.digest() == b.digest()  # the same steps: bit for bit the same, momentum included
    b.optimizer.state[b.outer[0]]["momentum_buffer"].add_(1e-3)
    assert a.digest() != b.digest()  # the outer optimizer's state counts

    def said(round_, digest=b"x" * 16):  # noqa: ANN001, ANN202
        return {"round": round_, "digest": digest}

    same = {"me": said(3), "you": said(3)}
    assert catch_up_round("me", same, ["me", "you"], listening=False) is None
    assert catch_up_round("me", same, ["you"], listening=True) is None
    behind = {"me": said(2), "you": said(3)}
    assert catch_up_round("me", behind, ["me", "you"], listening=False) == 4
    assert catch_up_round("me", behind, ["you"], listening=True) == 4
    differs = {"me": said(3, b"y" * 16), "you": said(3)}
    assert catch_up_round("me", differs, ["you"], listening=True) == 4
    assert catch_up_round("me", differs, ["me", "you"], listening=False) is None  # a contributor: the others agree
    assert catch_up_round("me", {"me": said(5), "you": said(3)}, ["me", "you"], listening=False) is None  # ahead
    # what a member announced in a wrong shape counts for nothing; nor do members left out of the aggregate
    for junk in (None, 7, {"round": "9"}, {"round": 9}, {"round": 2**40, "digest": b""}, {"round": True, "digest": b""}):
        assert catch_up_round("me", {"me": said(2), "you": junk}, ["me", "you"], listening=False) is None
    assert catch_up_round("me", {"me": said(2), "you": said(9)}, ["me"], listening=False) is None
    assert catch_up_round("me", {"you": said(9)}, ["me", "you"], listening=False) is None
