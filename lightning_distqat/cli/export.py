"""``distqat-export``: turn a Lightning checkpoint of a swarm-trained model into a torchao-quantized checkpoint
(a Hydra app over ``conf/export.yaml``)."""

from __future__ import annotations

import logging

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

__all__ = ["export", "main"]


def export(cfg: DictConfig) -> str:
    """Build ``cfg.model``, load ``cfg.checkpoint`` (a Lightning checkpoint), convert ``cfg.stages`` with
    ``cfg.quant`` and write ``cfg.output``. Returns the output path."""
    import torch

    from lightning_distqat.config import QuantConfig
    from lightning_distqat.quant.export import export_quantized

    model = instantiate(cfg.model)
    trusted = bool(cfg.get("trusted_checkpoint", False))
    try:
        checkpoint = torch.load(cfg.checkpoint, map_location="cpu", weights_only=not trusted)
    except Exception as e:  # noqa: BLE001 - torch's UnpicklingError names the type it would not load
        if trusted:
            raise
        raise SystemExit(f"distqat-export: {cfg.checkpoint} holds more than tensors and plain values, which are not "
                         f"loaded from a file by default ({type(e).__name__}: {str(e).splitlines()[0]}). If you trust "
                         "this file, add trusted_checkpoint=true") from None
    model.load_state_dict(checkpoint.get("state_dict", checkpoint))
    quant: QuantConfig = instantiate(cfg.quant, _convert_="all")
    export_quantized(model, list(cfg.stages), quant, cfg.output)
    print(f"distqat-export: wrote {cfg.output} (stages {list(cfg.stages)}, QAT scheme {quant.qat})", flush=True)
    return str(cfg.output)


@hydra.main(version_base=None, config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    logging.getLogger("lightning_distqat").setLevel(logging.INFO)
    export(cfg)


if __name__ == "__main__":
    main()
