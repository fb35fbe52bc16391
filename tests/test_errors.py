"""Bad input gets clear errors; one bad request never breaks an expert (a dead expert: tests/test_failover.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_distqat import DistqatStrategy, ExpertError, ExpertUnavailableError, SwarmConfig
from lightning_distqat.config import ExpertConfig
from lightning_distqat.swarm.client import SwarmClient
from lightning_distqat.swarm.embedded import EmbeddedSwarm
from lightning_distqat.swarm.messages import flatten_structure
from lightning_distqat.swarm.records import stage_fingerprint
from tests.helpers import ThreeStageNet, quiet_trainer, toy_loader


def test_bad_stage_path_names_it_and_lists_valid_paths():
    trainer = quiet_trainer(max_steps=1, strategy=DistqatStrategy(stages=["stem", "bdy"]))
    with pytest.raises(ValueError) as info:
        trainer.fit(ThreeStageNet(), toy_loader())
    message = str(info.value)
    assert "'bdy'" in message and "ThreeStageNet" in message
    assert "available:" in message and "body" in message and "stem" in message


def test_overlapping_stages_are_refused():
    trainer = quiet_trainer(max_steps=1, strategy=DistqatStrategy(stages=["body", "body.0"]))
    with pytest.raises(ValueError, match="lies inside stage 'body'"):
        trainer.fit(ThreeStageNet(), toy_loader())


@pytest.fixture
def one_expert():
    """A real expert process hosting Linear(4, 3) and a trainer-side client holding its lease."""
    torch.manual_seed(0)
    stage = nn.Linear(4, 3)
    client = SwarmClient(SwarmConfig(experiment="errors", request_timeout=20, discovery_timeout=30))
    swarm = EmbeddedSwarm({"proj": stage}, expert_config=ExpertConfig(experiment="errors"))
    try:
        client.start()
        swarm.start(client.visible_maddrs)
        handle = client.claim_pipeline({"proj": stage_fingerprint(stage)})["proj"]
        yield stage, handle, client
    finally:
        client.release_all()
        swarm.shutdown()
        client.shutdown()


@pytest.mark.swarm
def test_expert_rejects_bad_tensors_and_serves_the_next_request(one_expert):
    stage, handle, _ = one_expert
    layout, _ = flatten_structure(((torch.empty(0),), {}))
    weights_before = handle.get_state()["module"]

    with pytest.raises(ExpertError) as wrong_shape:
        handle.forward("a", layout, [torch.randn(2, 5)], training=True, need_grad=True)
    assert "stage 'proj'" in str(wrong_shape.value) and "expert" in str(wrong_shape.value)
    assert "shape" in str(wrong_shape.value) or "mat1" in str(wrong_shape.value)
    assert not isinstance(wrong_shape.value, ExpertUnavailableError)

    with pytest.raises(ExpertError, match="dtype|Double|Float"):
        handle.forward("b", layout, [torch.randn(2, 4, dtype=torch.float64)], training=True, need_grad=True)

    x = torch.randn(2, 4)
    (out,), out_layout = handle.forward("c", layout, [x], training=True, need_grad=True)
    assert out_layout == {"tree": None, "leaves": ["t"]}
    assert torch.allclose(out, stage(x), atol=1e-6)

    with pytest.raises(ExpertError, match="output grad has shape"):
        handle.backward("c", [torch.ones(5, 5)])
    (grad_x,) = handle.backward("c", [torch.ones(2, 3)])  # the context survived the bad backward
    assert torch.allclose(grad_x, torch.ones(2, 3) @ stage.weight.detach(), atol=1e-6)

    with pytest.raises(ExpertError, match="no forward with id"):
        handle.backward("never-sent", [torch.ones(2, 3)])

    after = handle.get_state()["module"]
    assert all(torch.equal(after[k], weights_before[k]) for k in after), "bad requests changed the weights"


@pytest.mark.swarm
def test_lease_keeps_other_trainers_out(one_expert):
    _, handle, client = one_expert
    other = SwarmClient(SwarmConfig(experiment="errors", initial_peers=client.visible_maddrs, request_timeout=20))
    try:
        other.start()
        intruder = other.handle("proj", handle.peer_id)
        assert intruder.claim(ttl=30)["granted"] is False
        with pytest.raises(ExpertError, match="needs the expert's lease"):
            intruder.get_state()
    finally:
        other.shutdown()
