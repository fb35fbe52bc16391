"""DiLoCo math against a plain single-process reference (k replicas in a loop), no network."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lightning_distqat.diloco.config import DiLoCoConfig
from lightning_distqat.diloco.outer import OuterState


def _data(k: int, steps: int, seed: int = 0) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(8, 5, generator=g), torch.randn(8, 2, generator=g)) for _ in range(steps)] for _ in range(k)]


def _inner(model: nn.Module, opt: torch.optim.Optimizer, batches) -> None:
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def test_outer_state_matches_reference_diloco():
    k, H, rounds, lr, mu = 3, 4, 3, 0.7, 0.9
    weights = [1.0, 2.0, 3.0]  # samples processed by each replica
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    data = _data(k, H * rounds)

    # the implementation
    models = [copy.deepcopy(base) for _ in range(k)]
    inner = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    states = [OuterState(list(m.parameters()), DiLoCoConfig(inner_steps=H, outer_lr=lr, outer_momentum=mu)) for m in
              models]
    for r in range(rounds):
        for i in range(k):
            _inner(models[i], inner[i], data[i][r * H:(r + 1) * H])
        pseudo = [s.pseudo_gradients() for s in states]
        averaged = [sum(w * p[j] for w, p in zip(weights, pseudo)) / sum(weights) for j in range(len(pseudo[0]))]
        for s in states:
            s.apply(averaged)

    # the reference, written out by hand: Nesterov SGD on the outer params
    ref_models = [copy.deepcopy(base) for _ in range(k)]
    ref_inner = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in ref_models]
    outer = [p.detach().clone() for p in base.parameters()]
    momentum = [torch.zeros_like(p) for p in outer]
    for r in range(rounds):
        for i in range(k):
            _inner(ref_models[i], ref_inner[i], data[i][r * H:(r + 1) * H])
        for j, o in enumerate(outer):
            delta = sum(w * (o - list(m.parameters())[j].detach()) for w, m in zip(weights, ref_models)) / sum(weights)
            momentum[j] = mu * momentum[j] + delta
            outer[j] = o - lr * (delta + mu * momentum[j])
        for m in ref_models:
            with torch.no_grad():
                for p, o in zip(m.parameters(), outer):
                    p.copy_(o)

    for s in states:
        assert s.round == rounds
        for got, want in zip(s.outer, outer):
            assert torch.allclose(got.detach(), want, rtol=1e-6, atol=1e-7)
    for m in models:  # local params were reset to the outer params
        for p, want in zip(m.parameters(), outer):
            assert torch.allclose(p.detach(), want, rtol=1e-6, atol=1e-7)


def test_h1_sgd_outer_lr_1_no_momentum_equals_synchronous_data_parallel():
    k, steps, lr = 2, 5, 0.1
    torch.manual_seed(1)
    base = nn.Linear(5, 2)
    data = _data(k, steps, seed=3)

    models = [copy.deepcopy(base) for _ in range(k)]
    inner = [torch.optim.SGD(m.parameters(), lr=lr) for m in models]
    cfg = DiLoCoConfig(inner_steps=1, outer_lr=1.0, outer_momentum=0.0, nesterov=False)
    states = [OuterState(list(m.parameters()), cfg) for m in models]
    for t in range(steps):
        for i in range(k):
            _inner(models[i], inner[i], [data[i][t]])
        pseudo = [s.pseudo_gradients() for s in states]
        averaged = [(pseudo[0][j] + pseudo[1][j]) / 2 for j in range(len(pseudo[0]))]
        for s in states:
            s.apply(averaged)

    sync = copy.deepcopy(base)  # synchronous data parallelism: average the gradients, one SGD step
    opt = torch.optim.SGD(sync.parameters(), lr=lr)
    for t in range(steps):
        opt.zero_grad()
        for i in range(k):
            (nn.functional.mse_loss(sync(data[i][t][0]), data[i][t][1]) / k).backward()
        opt.step()
    for got, want in zip(models[0].parameters(), sync.parameters()):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


def test_state_dict_round_trip_for_late_joiners():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    cfg = DiLoCoConfig(inner_steps=1)
    sa, sb = OuterState(list(a.parameters()), cfg), OuterState(list(b.parameters()), cfg)
    with torch.no_grad():
        a.weight.add_(1.0)
    sa.apply(sa.pseudo_gradients())
    sb.load_state_dict(sa.state_dict())
    assert sb.round == 1
    assert torch.equal(b.weight, a.weight) and torch.equal(sb.outer[0], sa.outer[0])
    assert torch.equal(sb.optimizer.state_dict()["state"][0]["momentum_buffer"],
                       sa.optimizer.state_dict()["state"][0]["momentum_buffer"])


def test_adapted_batch_takes_the_fastest_replicas_step_time_and_converges():
    from lightning_distqat.diloco.pace import adapted_batch, parse_pace

    fast, slow = {"sps": 0.001, "full": 64}, {"sps": 0.003, "full": 64}  # 64 ms and 192 ms per whole batch
    assert adapted_batch(fast, [fast, slow]) == 64  # the fastest keeps its whole batch
    assert adapted_batch(slow, [fast, slow]) == 21  # 64 ms / 3 ms per sample
    junk = [None, {"sps": -1.0, "full": 64}, {"sps": float("nan"), "full": 2}, {"sps": 1e-9, "full": True},
            {"sps": 1e-9, "full": 64, "extra": 1}, {"sps": 1, "full": 64}, "fast"]
    assert all(parse_pace(j) is None for j in junk)
    assert adapted_batch(slow, [slow, *junk]) == 64  # a stranger's junk cannot shrink a replica's batch

    # a step costs c + a * b: the batch converges to the fastest replica's step time, without overshooting
    c, a, tau, b = 0.02, 0.003, 0.02 + 0.001 * 64, 64
    history = []
    for _ in range(8):
        sps = (c + a * b) / b
        b = adapted_batch({"sps": sps, "full": 64}, [{"sps": tau / 64, "full": 64}])
        history.append(b)
    assert history == sorted(history, reverse=True), history
    assert abs((c + a * history[-1]) - tau) <= 0.05 * tau, history


def test_per_replica_fields_are_not_shared_with_experts():
    config = DiLoCoConfig(inner_steps=5, adaptive_batch_size=True, batch_size_per_step=16)
    shared = config.shared()
    assert "adaptive_batch_size" not in shared and "batch_size_per_step" not in shared and shared["inner_steps"] == 5
    assert DiLoCoConfig(**shared).shared() == shared
    import pytest

    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size_per_step"):
            DiLoCoConfig(batch_size_per_step=bad)


def test_a_damped_batch_follows_the_target_without_overshooting():
    from lightning_distqat.diloco.pace import adapted_batch

    c, a, tau, b = 0.02, 0.003, 0.02 + 0.001 * 64, 64  # as above: the fixed point is about 21
    history = []
    for _ in range(12):
        b = adapted_batch({"sps": (c + a * b) / b, "full": 64, "batch": b}, [{"sps": tau / 64, "full": 64}])
        history.append(b)
    assert history == sorted(history, reverse=True) and history[0] < 64, history
    assert abs((c + a * history[-1]) - tau) <= 0.05 * tau, history


def test_the_fastest_replica_keeps_its_whole_batch_whatever_the_earlier_rounds_said():
    from lightning_distqat.diloco.pace import adapted_batch

    fastest = {"sps": 0.002, "full": 64, "batch": 64}
    assert adapted_batch(fastest, [{"sps": 0.01, "full": 64}], tau=0.05) == 64  # an earlier, faster round's target
    slow = {"sps": 0.004, "full": 64, "batch": 64}
    assert adapted_batch(slow, [{"sps": 0.002, "full": 64}], tau=0.2) == adapted_batch(slow, [{"sps": 0.002,
                                                                                               "full": 64}])
    assert adapted_batch(slow, [{"sps": 0.002, "full": 64}], tau=0.064) < adapted_batch(slow, [{"sps": 0.002,
                                                                                                "full": 64}])


def test_a_part_already_at_the_target_round_skips_it_and_keeps_its_inner_progress():
    """A replacement that caught up with its group ahead of its trainer's other parts: the trainer's next round
    targets the lowest part's round + 1, and the part that is already there skips it."""
    from lightning_distqat.diloco.sync import DiLoCoSync

    model = torch.nn.Linear(3, 2)
    sync = DiLoCoSync(list(model.parameters()), DiLoCoConfig(inner_steps=2), dht=None, prefix="t", solo=True).start()
    with torch.no_grad():
        model.weight.add_(0.5)
    assert sync.round(8.0, target=1).round == 1
    with torch.no_grad():
        model.weight.add_(0.25)  # inner progress after round 1
    local = [p.detach().clone() for p in model.parameters()]
    outer = [o.detach().clone() for o in sync.state.outer]
    report = sync.round(8.0, target=1)
    assert report.skipped and report.round == 1 and report.group_size == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), local)), "a skipped round keeps the inner steps"
    assert all(torch.equal(o, q) for o, q in zip(sync.state.outer, outer))
    assert not sync.round(8.0, target=2).skipped and sync.state.round == 2


def test_a_part_that_went_past_its_target_skips_its_next_round_once():
    """``TrainerRounds`` with stand-in experts (pure logic). Each part's round targets its last round + 1; a part
    whose round took it further (a replacement that caught up with a group a round ahead) gets its own round as the
    next target, so it skips once and is in step with the trainer's other parts again. What an expert reports as
    its round counts only if it is an int in [0, 2^31)."""
    from dataclasses import asdict

    from lightning_distqat.diloco.rounds import TrainerRounds
    from lightning_distqat.diloco.sync import RoundReport

    class Stage:
        def __init__(self, name, at, jumps=(), says=None):
            self.stage, self.at, self.jumps, self.says, self.targets = name, at, list(jumps), says, []

        def diloco(self, op, timeout=None, **fields):
            if op == "start":
                return {"round": self.at}
            self.targets.append(fields["target"])
            skipped = fields["target"] is not None and self.at >= fields["target"]
            if not skipped:
                self.at += 1 + (self.jumps.pop(0) if self.jumps else 0)
            report = asdict(RoundReport(self.at, 0 if skipped else 2, 10, 10, skipped=skipped))
            return {**report, "round": self.says if self.says is not None else self.at, "checksum": 0.0}

    stages = {"stem": Stage("stem", 2), "body": Stage("body", 2, jumps=[1, 0, 0]), "head": Stage("head", 2, says="x")}
    rounds = TrainerRounds(DiLoCoConfig(inner_steps=1), handles=stages, local_params=[], dht=None, experiment="t",
                           solo=False, request_timeout=5.0)
    try:
        assert rounds.start() == 2
        first = rounds.inner_step_done()
        assert first["round"] == 3 and first["group_sizes"] == {"stem": 2, "body": 2, "head": 2}
        assert stages["body"].at == 4  # went past its target (3)
        second = rounds.inner_step_done()
        assert stages["stem"].targets == [3, 4] and stages["body"].targets == [3, 4]
        assert second["group_sizes"]["body"] == 0 and second["group_size"] == 2 and stages["body"].at == 4
        rounds.inner_step_done()
        assert stages["stem"].targets[-1] == stages["body"].targets[-1] == 5 and stages["stem"].at == stages["body"].at
        assert stages["head"].targets == [3, None, None], "a round that is not an int gives no target"
    finally:
        rounds.finish(keep_outer=False)
