"""Wire codecs, QuantConfig resolution and the pseudo-gradient compression adapter (pure logic, no processes)."""

from __future__ import annotations

import pytest
import torch
from hivemind.compression import CompressionInfo, deserialize_torch_tensor, serialize_torch_tensor

from lightning_distqat.config import QuantConfig
from lightning_distqat.diloco.compression import pseudo_gradient_compression
from lightning_distqat.quant.codecs import QuantizationError, decode, decode_all, encode, encode_all, payload_bytes


def _mse(codec: str, block: int, shape=(4096, 16)) -> tuple[float, float]:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    header, parts = encode(x, codec, block)
    y = decode(header, parts)
    assert y.shape == x.shape and y.dtype == x.dtype
    return float(((x - y) ** 2).mean()), payload_bytes(parts) / (x.numel() * 4)


@pytest.mark.parametrize("codec,block,max_mse,max_ratio", [
    ("fp16", 64, 5e-8, 0.5), ("bf16", 64, 5e-6, 0.5), ("int8", 64, 5e-5, 0.258), ("int8", 256, 5e-5, 0.253),
    ("int4", 32, 1.2e-2, 0.141),
])
def test_codec_error_and_size_bounds_on_normal_data(codec, block, max_mse, max_ratio):
    mse, ratio = _mse(codec, block)
    assert mse <= max_mse, f"{codec}/{block}: MSE {mse:.3g} > {max_mse}"
    assert ratio <= max_ratio, f"{codec}/{block}: {ratio:.4f} x fp32 bytes"


def test_none_is_exact_and_passes_non_finite_values():
    x = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 1e30])
    header, parts = encode(x, "none")
    assert torch.equal(decode(header, parts).nan_to_num(), x.nan_to_num()) and decode(header, parts).isnan()[1]


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8", "int4"])
def test_lossy_codecs_refuse_non_finite_values(codec):
    x = torch.randn(100)
    x[17] = float("nan")
    with pytest.raises(QuantizationError, match=r"stage 'body' output: 1 non-finite value\(s\)"):
        encode(x, codec, 32, "stage 'body' output")


@pytest.mark.parametrize("magnitude", [1e-9, 1e-6, 1.0, 1e6])
def test_fp16_keeps_relative_precision_at_any_magnitude(magnitude):
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1)) * magnitude
    header, parts = encode(x, "fp16")
    y = decode(header, parts)
    assert torch.isfinite(y).all()
    assert float(((x - y) ** 2).mean()) <= 5e-8 * magnitude**2  # no underflow of small gradients, no overflow


@pytest.mark.parametrize("n", [1, 2, 31, 33, 65])
def test_int4_and_int8_handle_ragged_sizes_and_zeros(n):
    x = torch.randn(n)
    x[0] = 0.0
    for codec, block in (("int8", 16), ("int4", 16)):
        header, parts = encode(x, codec, block)
        y = decode(header, parts)
        assert y.shape == x.shape and y[0] == 0
        assert torch.allclose(y, x, atol=float(x.abs().max()) / (7 if codec == "int4" else 127))
    header, parts = encode(torch.zeros(n), "int8", 16)
    assert torch.equal(decode(header, parts), torch.zeros(n))


def test_integer_tensors_pass_through_and_many_tensors_round_trip():
    ids = torch.arange(10)
    half = torch.randn(3, 5).half()
    headers, flat = encode_all([ids, half, torch.randn(7)], "int8", 64, "inputs")
    out = decode_all(headers, flat)
    assert torch.equal(out[0], ids) and out[1].dtype == torch.float16 and out[2].shape == (7,)
    with pytest.raises(ValueError, match="codec headers describe"):
        decode_all(headers, flat + [ids])


def test_decoding_is_bounded_before_anything_is_allocated():
    """int4 codes claiming float64 values grow 16-fold when decoded: the cap counts decoded bytes."""
    headers, flat = encode_all([torch.randn(4096).double()], "int4", 64, "inputs")
    assert len(decode_all(headers, flat, max_bytes=4096 * 8)[0]) == 4096
    with pytest.raises(ValueError, match="decodes to 32768 bytes; at most 16384"):
        decode_all(headers, flat, max_bytes=16384)
    for shape in ([0] * 17, [0, 2**60], [True, 1]):
        with pytest.raises(ValueError, match="bad dtype or shape"):
            decode_all([{**headers[0], "shape": shape}], flat)


def test_quant_config_overrides_and_the_single_switch():
    q = QuantConfig(activations="int8", gradients="fp16", qat="int8-int4",
                    stages={"head": {"activations": "none", "qat": None}})
    assert q.for_stage("body").activations == "int8" and q.for_stage("head").activations == "none"
    assert q.for_stage("head").gradients == "fp16" and q.for_stage("head").qat is None
    assert q.wire_codec("activations") == ("int8", 256)
    off = QuantConfig(enabled=False, activations="int8", pseudo_gradients="int4", qat="int8-int4")
    assert (off.for_stage("body").activations, off.for_stage("body").pseudo_gradients, off.for_stage("body").qat) \
        == ("none", "none", None)
    with pytest.raises(ValueError, match=r"QuantConfig.stages\['head'\]: unknown field\(s\) \['activation'\]"):
        QuantConfig(stages={"head": {"activation": "int8"}})


@pytest.mark.parametrize("kwargs,message", [
    (dict(activations="int3"), r"QuantConfig.activations='int3' is not a codec; valid: none, fp16, bf16, int8, int4"),
    (dict(pseudo_gradients="bf16"), r"QuantConfig.pseudo_gradients='bf16' is not a codec; valid: none, fp16, int8"),
    (dict(qat="int2"), r"QuantConfig.qat='int2' is not a QAT scheme; valid: int8-int4, int4-weight or None"),
    (dict(stages={"head": {"gradients": "int9"}}), r"QuantConfig.stages\['head'\].gradients='int9' is not a codec"),
    (dict(int4_block_size=31), r"QuantConfig.int4_block_size=31 must be even"),
    (dict(block_size=0), r"QuantConfig.block_size=0 must be an int >= 2"),
])
def test_bad_quant_settings_fail_at_construction_naming_field_and_valid_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


@pytest.mark.parametrize("codec,max_ratio", [("fp16", 0.51), ("int8", 0.26), ("int4", 0.141)])
def test_pseudo_gradient_compression_through_hivemind_serialization(codec, max_ratio):
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(2))
    compression = pseudo_gradient_compression(codec, 256 if codec != "int4" else 32)
    serialized = compression.compress(x, CompressionInfo.from_tensor(x))
    restored = deserialize_torch_tensor(serialized)  # hivemind's own dispatch, as in its all-reduce
    assert restored.dtype == torch.float32 and restored.shape == x.shape
    assert len(serialized.buffer) / (x.numel() * 4) <= max_ratio
    assert float(((restored - x) ** 2).mean()) < (1.2e-2 if codec == "int4" else 1e-4)  # int4/32 averages 9.4e-3
    assert torch.equal(deserialize_torch_tensor(serialize_torch_tensor(x)), x)  # hivemind's NONE is untouched


def test_quant_presets_build_quant_configs():
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import lightning_distqat

    presets = sorted((Path(lightning_distqat.__file__).parent / "conf" / "quant").glob("*.yaml"))
    assert {p.stem for p in presets} >= {"none", "fp16_wire", "int8_wire", "int4_wire", "qat_int8_int4"}
    for preset in presets:
        q = instantiate(OmegaConf.load(preset))
        assert isinstance(q, QuantConfig), preset  # a QuantConfig checks every setting as it is built
    assert instantiate(OmegaConf.load(presets[0].with_name("none.yaml"))).for_stage("x").activations == "none"
