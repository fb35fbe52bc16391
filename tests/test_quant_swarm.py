"""Quantization through a real swarm: int8 on the wire (bytes and loss against fp32), torchao QAT on the experts,
and the export of the trained model to torchao-quantized weights (API and `distqat-export`)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from lightning_distqat import DataConfig, DistqatStrategy, ExpertError, QuantConfig, SharedMemoryDataModule
from lightning_distqat.models import ResNetClassifier
from lightning_distqat.quant.export import export_quantized, load_quantized
from lightning_distqat.quant.qat import fake_quantized_linears, prepare
from tests.helpers import ThreeStageNet, quiet_trainer, toy_loader

pytestmark = [pytest.mark.swarm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def _digits() -> SharedMemoryDataModule:
    return SharedMemoryDataModule(DataConfig(source="sklearn-digits", image_size=32, val_fraction=0.15, batch_size=64,
                                             drop_last=True, seed=0))


def _resnet_fit(quant: QuantConfig | None, steps: int) -> tuple[ResNetClassifier, list[float], dict[str, int]]:
    pl.seed_everything(0)
    model = ResNetClassifier("resnet18", num_classes=10, lr=0.05, max_steps=steps)
    losses: list[float] = []

    class _Losses(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    strategy = DistqatStrategy(stages=ResNetClassifier.STAGES, quant=quant)
    quiet_trainer(max_steps=steps, strategy=strategy, limit_val_batches=0, callbacks=[_Losses()]).fit(
        model, datamodule=_digits())
    return model, losses, strategy.wire_bytes()


@pytest.mark.timeout(480)
def test_int8_on_the_wire_quarter_bytes_and_the_loss_of_fp32():
    """The [foundation] example (ResNet-18, 4 experts) with int8 activations and gradients: bytes against an fp32 run
    of the same steps; training converges; the trained model's held-out loss through real int8 calls is within 2% of
    the same weights' loss in fp32 (the loss after N steps of two runs is compared in the benchmark: it is dominated
    by run-to-run chaos at this length, see README)."""
    steps = 30
    _, fp32_losses, fp32_bytes = _resnet_fit(None, steps)
    model, int8_losses, int8_bytes = _resnet_fit(QuantConfig(activations="int8", gradients="int8"), steps)
    sent = int8_bytes["bytes_sent"] / fp32_bytes["bytes_sent"]
    received = int8_bytes["bytes_received"] / fp32_bytes["bytes_received"]
    assert sent <= 0.26 and received <= 0.26, (sent, received)
    assert sum(int8_losses[-5:]) < 0.5 * sum(int8_losses[:5]), int8_losses

    local = quiet_trainer().validate(model, datamodule=_digits(), verbose=False)[0]["val_loss"]
    strategy = DistqatStrategy(stages=ResNetClassifier.STAGES, quant=QuantConfig(activations="int8"))
    through_int8 = quiet_trainer(strategy=strategy).validate(model, datamodule=_digits(), verbose=False)[0]["val_loss"]
    assert strategy.wire_bytes()["bytes_sent"] > 0
    assert abs(through_int8 - local) <= 0.02 * local, (through_int8, local)


class _ExpertReport(Callback):
    """Asks every expert, during training, how many torchao fake-quantized linears its stage holds."""

    def __init__(self) -> None:
        self.info: dict[str, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            self.info = {s: h.info() for s, h in trainer.strategy.pipeline.handles.items()}


def _eval_loss(model, loader) -> float:
    with torch.no_grad():
        return float(sum(F.cross_entropy(model(x), y, reduction="sum") for x, y in loader) / len(loader.dataset))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scheme", ["int8-int4", "int4-weight"])
def test_qat_on_experts_and_export_to_torchao(tmp_path, scheme):
    quant = QuantConfig(qat=scheme, qat_group_size=16, stages={"head": {"qat": None}})
    torch.manual_seed(0)
    model = ThreeStageNet()
    report = _ExpertReport()
    trainer = quiet_trainer(max_steps=30, callbacks=[report],
                            strategy=DistqatStrategy(stages=["stem", "body", "head"], quant=quant))
    trainer.fit(model, toy_loader(n=240, batch_size=16))
    assert report.info["body"]["qat"] == [scheme, 16]
    assert report.info["stem"]["fake_quantized_linears"] == 1 and report.info["body"]["fake_quantized_linears"] == 2
    assert report.info["head"]["fake_quantized_linears"] == 0 and report.info["head"]["qat"] is None
    assert fake_quantized_linears(model) == 0, "the module that comes home is plain torch"
    ckpt = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(ckpt)

    held_out = toy_loader(n=256, batch_size=64, seed=7)
    qat_model = copy.deepcopy(model)
    for stage in ("stem", "body"):  # what the experts computed: the same fake quantizers
        prepare(qat_model.get_submodule(stage), scheme, 16)
    qat_loss = _eval_loss(qat_model, held_out)
    exported = export_quantized(copy.deepcopy(model), ["stem", "body", "head"], quant, str(tmp_path / "q.pt"))
    assert type(exported.body[0].weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert isinstance(exported.head.weight, torch.nn.Parameter) and type(exported.head.weight.data) is torch.Tensor
    exported_loss = _eval_loss(exported, held_out)
    assert abs(exported_loss - qat_loss) <= 1e-3 * qat_loss, (exported_loss, qat_loss)
    assert abs(_eval_loss(load_quantized(ThreeStageNet(), str(tmp_path / "q.pt")), held_out) - exported_loss) < 1e-6

    out = tmp_path / "cli.pt"
    result = subprocess.run(
        [str(Path(sys.executable).with_name("distqat-export")), "model._target_=tests.helpers.ThreeStageNet",
         f"checkpoint={ckpt}", "stages=[stem,body,head]", f"quant.qat={scheme}", "quant.qat_group_size=16",
         "+quant.stages={head: {qat: null}}",
         f"output={out}", f"hydra.run.dir={tmp_path}/hydra"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert abs(_eval_loss(load_quantized(ThreeStageNet(), str(out)), held_out) - exported_loss) < 1e-6


def test_qat_group_size_that_does_not_fit_is_a_clear_error():
    quant = QuantConfig(qat="int8-int4", qat_group_size=16)
    trainer = quiet_trainer(max_steps=1, strategy=DistqatStrategy(stages=["stem", "body"], quant=quant))
    with pytest.raises(ExpertError, match=r"stage 'body': qat_group_size=16 must divide the in_features of every "
                                        r"linear layer; it does not for 0 \(in_features=24\)"):
        trainer.fit(ThreeStageNet(width=24), toy_loader())
