"""GPT-Neo and wav2vec 2.0 (transformers' modules, random init) through the swarm: the staged forward is exactly
transformers' own model; through experts the parameters match plain Lightning after 3 steps; the examples train 20
steps with a loss that goes down (GPT-Neo also with int8 on the wire and with QAT; wav2vec 2.0 also as two DiLoCo
replicas) on data the tests make and load through the real loading path, with no download."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_distqat import DistqatStrategy
from lightning_distqat.config import DataConfig, ExpertConfig
from lightning_distqat.models import GPTNeoLM, Wav2Vec2CTC
from lightning_distqat.swarm.dht import start_dht
from lightning_distqat.swarm.embedded import EmbeddedSwarm
from tests.helpers import fit_params, max_rel_diff

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The synthetic data sets are written here once for the module (XDG_CACHE_HOME of every process)."""
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = old


def _batches(cfg: DataConfig, n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of ``cfg`` made as the data server makes them (load_splits + the task's collate)."""
    from lightning_distqat.data.sources import load_splits
    from lightning_distqat.data.tasks import make_collate

    train = load_splits(cfg).train
    collate = make_collate(cfg, train.column_names)
    out = []
    for i in range(n):
        rows = train[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        out.append({k: torch.from_numpy(v) for k, v in collate(rows).items()})
    return out


FAMILIES = {
    "gpt_neo": (lambda: GPTNeoLM(hidden_size=32, num_heads=4, stage_layers=[1, 1], max_position_embeddings=64,
                                 window_size=16, lr=1e-3),
                DataConfig(source="synthetic-stories", task="causal_lm", seq_len=32, batch_size=4)),
    "wav2vec2": (lambda: Wav2Vec2CTC(hidden_size=32, num_heads=4, intermediate_size=64, stage_layers=[1, 1],
                                     conv_dim=[16, 16, 16], lr=1e-3),
                 DataConfig(source="synthetic-spoken-digits", task="speech", max_audio_seconds=1.0, batch_size=4)),
}


def test_the_staged_models_are_transformers_own(cache):
    """Same weights, same batch: our stages chained give transformers' logits (and CTC loss) exactly."""
    from transformers import GPTNeoForCausalLM, Wav2Vec2ForCTC

    torch.manual_seed(0)
    gpt = FAMILIES["gpt_neo"][0]()
    batch = _batches(FAMILIES["gpt_neo"][1], 1)[0]
    ref = GPTNeoForCausalLM(gpt.config)
    t = ref.transformer
    t.wte, t.wpe, t.ln_f, ref.lm_head = gpt.embed.wte, gpt.embed.wpe, gpt.head.ln_f, gpt.head.lm_head
    t.h = torch.nn.ModuleList([b for group in gpt.blocks for b in group.blocks])
    valid = batch["attention_mask"].bool()
    theirs = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(gpt(batch["input_ids"], batch["attention_mask"])[valid], theirs[valid])

    # the positional convolution's weight norm, as a plain module the experts can receive: same values, same grads
    from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2PositionalConvEmbedding

    from lightning_distqat.models.wav2vec2 import WeightNormConv1d

    w2v = FAMILIES["wav2vec2"][0]()
    parametrized = Wav2Vec2PositionalConvEmbedding(w2v.config).conv
    ours = WeightNormConv1d(parametrized, dim=2)
    x = torch.randn(2, w2v.config.hidden_size, 40)
    theirs_out, ours_out = parametrized(x), ours(x)
    torch.testing.assert_close(ours_out, theirs_out, rtol=0, atol=0)
    theirs_out.square().sum().backward()
    ours_out.square().sum().backward()
    torch.testing.assert_close(ours.weight_g.grad, parametrized.parametrizations.weight.original0.grad)
    torch.testing.assert_close(ours.weight_v.grad, parametrized.parametrizations.weight.original1.grad)

    batch = _batches(FAMILIES["wav2vec2"][1], 1)[0]
    ref = Wav2Vec2ForCTC(w2v.config)
    w = ref.wav2vec2
    w.feature_extractor, w.feature_projection = w2v.features.feature_extractor, w2v.features.feature_projection
    w.encoder.pos_conv_embed, w.encoder.layer_norm = w2v.features.pos_conv_embed, w2v.features.layer_norm
    w.encoder.layers = torch.nn.ModuleList([layer for group in w2v.layers for layer in group.layers])
    ref.lm_head = w2v.head.lm_head
    out = ref(input_values=batch["input_values"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    logits, frames = w2v(batch["input_values"], batch["attention_mask"])
    valid = frames.bool()
    torch.testing.assert_close(logits[valid], out.logits[valid], rtol=0, atol=1e-6)
    torch.testing.assert_close(w2v.ctc_loss(logits, frames, batch["labels"]), out.loss, rtol=1e-6, atol=0)


@pytest.mark.swarm
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_parameters_match_plain_lightning_after_3_steps(cache, family):
    make, data = FAMILIES[family]
    batches = _batches(data, 3)

    def loader() -> DataLoader:
        return DataLoader(batches, batch_size=None)

    stages = make().STAGES
    net = make()
    swarm = EmbeddedSwarm({s: net.get_submodule(s) for s in stages}, expert_config=ExpertConfig(experiment=family))
    swarm.launch()
    dht = start_dht()
    try:
        maddrs = [str(m) for m in dht.get_visible_maddrs()]
        swarm.start(maddrs)
        torch.manual_seed(0)
        local, _ = fit_params(make, loader_fn=loader, max_steps=3)
        torch.manual_seed(0)
        strategy = DistqatStrategy(stages=stages, initial_peers=maddrs, experiment=family)
        remote, trainer = fit_params(make, loader_fn=loader, max_steps=3, strategy=strategy)
    finally:
        swarm.shutdown()
        dht.shutdown()
    assert trainer.global_step == 3
    diff = max_rel_diff(remote.state_dict(), local.state_dict())
    assert diff <= 1e-5, f"{family}: max relative parameter difference {diff:.2e}"
    torch.manual_seed(0)
    assert max_rel_diff(remote.state_dict(), make().state_dict()) > 1e-4, "the stages did not train"


def _example(script: str, *args: str, timeout: float = 240) -> str:
    result = subprocess.run([sys.executable, f"examples/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


@pytest.mark.swarm
@pytest.mark.timeout(600)
@pytest.mark.parametrize("quant", ["none", "int8_wire", "qat"])
def test_the_gpt_neo_example_trains_20_steps(cache, quant):
    output = _example("gpt_neo_embedded.py", "--steps", "20", "--batch-size", "8", "--seq-len", "32", "--quant", quant)
    assert "Summary: 20 steps" in output, output[-3000:]
    assert "4 experts serve ['embed', 'blocks.0', 'blocks.1', 'head']" in output, output[-3000:]


@pytest.mark.swarm
@pytest.mark.timeout(600)
@pytest.mark.parametrize("diloco", [False, True], ids=["one-pipeline", "diloco-2-replicas"])
def test_the_wav2vec2_example_trains_20_steps(cache, diloco):
    output = _example("wav2vec2_embedded.py", "--steps", "20", "--batch-size", "4", *(["--diloco"] if diloco else []))
    assert "Summary: 20 steps" in output, output[-3000:]
    if diloco:
        assert "8 experts serve ['features', 'layers.0', 'layers.1', 'head'] (2 per stage)" in output, output[-3000:]
        assert "DiLoCo on, an outer round every 10 inner steps" in output, output[-3000:]
