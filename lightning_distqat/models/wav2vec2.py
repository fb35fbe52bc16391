"""wav2vec 2.0 (``transformers``' modules, random init) with a CTC head, cut into stages: feature encoder +
projection (+ the encoder's positional convolution and norm), groups of encoder layers, the CTC head."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_distqat._quiet import quiet_transformers
from lightning_distqat.models.common import SequenceModel, stage_groups

__all__ = ["Wav2Vec2CTC"]


def frame_lengths(sample_lengths: torch.Tensor, kernels: Sequence[int], strides: Sequence[int]) -> torch.Tensor:
    """Frames the convolutional feature encoder makes of clips of ``sample_lengths`` samples."""
    lengths = sample_lengths
    for kernel, stride in zip(kernels, strides):
        lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
    return lengths


class WeightNormConv1d(nn.Module):
    """A ``Conv1d`` with weight normalisation (``weight = g * v / ||v||``, the norm taken over every dim but ``dim``),
    as ``torch.nn.utils.parametrizations.weight_norm`` computes it, with the same two parameters. Parametrized
    modules cannot be pickled (torch refuses: "only supported through state_dict()"), and the embedded swarm sends
    each stage to its expert by value, so the positional convolution uses this instead."""

    def __init__(self, conv: nn.Conv1d, dim: int) -> None:
        super().__init__()
        parametrized = conv.parametrizations.weight
        self.weight_g = nn.Parameter(parametrized.original0.detach().clone())
        self.weight_v = nn.Parameter(parametrized.original1.detach().clone())
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None
        self.dim, self.padding, self.stride, self.groups = dim, conv.padding, conv.stride, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch._weight_norm(self.weight_v, self.weight_g, self.dim)
        return F.conv1d(x, weight, self.bias, stride=self.stride, padding=self.padding, groups=self.groups)


class Wav2Vec2Features(nn.Module):
    """Waveforms -> frame features: the convolutional feature encoder, the projection, and the encoder's prelude
    (padded frames zeroed, positional convolution, layer norm), as ``Wav2Vec2Model`` and ``Wav2Vec2Encoder`` run them.
    Returns the hidden states and the (batch, frames) 0/1 frame mask."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        w = model.wav2vec2
        self.feature_extractor, self.feature_projection = w.feature_extractor, w.feature_projection
        # transformers' feature encoder sets requires_grad on a view of its input (for gradient checkpointing), which
        # fails when the input itself requires grad, as it does on an expert; the flag only guards that line
        self.feature_extractor._requires_grad = False
        self.pos_conv_embed, self.layer_norm, self.dropout = w.encoder.pos_conv_embed, w.encoder.layer_norm, \
            w.encoder.dropout
        self.kernels, self.strides = list(model.config.conv_kernel), list(model.config.conv_stride)
        conv = self.pos_conv_embed.conv
        if hasattr(conv, "parametrizations"):
            self.pos_conv_embed.conv = WeightNormConv1d(conv, dim=2)  # transformers normalises over dim 2

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.feature_extractor(input_values).transpose(1, 2)
        frames = frame_lengths(attention_mask.sum(-1), self.kernels, self.strides)
        mask = (torch.arange(features.shape[1], device=features.device)[None, :] < frames[:, None]).long()
        hidden, _ = self.feature_projection(features)
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)  # padded frames are zero before the encoder
        hidden = self.dropout(self.layer_norm(hidden + self.pos_conv_embed(hidden)))
        return hidden, mask


class Wav2Vec2Layers(nn.Module):
    """Consecutive encoder layers; builds the attention mask from the frame mask as ``Wav2Vec2Encoder`` does
    (``transformers.masking_utils.create_bidirectional_mask``)."""

    def __init__(self, layers: Sequence[nn.Module], config: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.config = config

    def forward(self, hidden: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        with quiet_transformers():
            from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=frame_mask.bool())
        for layer in self.layers:
            out = layer(hidden, attention_mask=mask)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


class Wav2Vec2Head(nn.Module):
    """Dropout and the CTC projection to the vocabulary."""

    def __init__(self, dropout: nn.Module, lm_head: nn.Linear) -> None:
        super().__init__()
        self.dropout, self.lm_head = dropout, lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.dropout(hidden))


class Wav2Vec2CTC(SequenceModel):
    """wav2vec 2.0 for CTC speech recognition from a ``Wav2Vec2Config`` with random init. Stages: ``features``,
    ``layers.<i>`` (groups of ``stage_layers`` encoder layers) and ``head``.

    Batches are the data server's ``speech`` batches (``input_values``, ``attention_mask`` over samples, ``labels``
    padded with -100; the byte tokenizer's ids are byte + 1, so 0 is the CTC blank and the vocabulary is 257).
    SpecAugment, LayerDrop and dropout are off by default (the experts' random streams differ from the trainer's)."""

    def __init__(self, vocab_size: int = 257, hidden_size: int = 64, num_heads: int = 4, intermediate_size: int = 128,
                 stage_layers: Sequence[int] = (2, 2), conv_dim: Sequence[int] = (32, 32, 32),
                 conv_kernel: Sequence[int] = (10, 8, 4), conv_stride: Sequence[int] = (5, 4, 2),
                 num_conv_pos_embeddings: int = 16, num_conv_pos_embedding_groups: int = 4, dropout: float = 0.0,
                 lr: float = 3e-4, weight_decay: float = 0.0) -> None:
        super().__init__()
        with quiet_transformers():
            from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

        self.save_hyperparameters()
        config = Wav2Vec2Config(
            vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=int(sum(int(n) for n in stage_layers)),
            num_attention_heads=num_heads, intermediate_size=intermediate_size, conv_dim=list(conv_dim),
            conv_kernel=list(conv_kernel), conv_stride=list(conv_stride),
            num_conv_pos_embeddings=num_conv_pos_embeddings, num_conv_pos_embedding_groups=num_conv_pos_embedding_groups,
            hidden_dropout=dropout, attention_dropout=dropout, activation_dropout=dropout, feat_proj_dropout=dropout,
            final_dropout=dropout, layerdrop=0.0, apply_spec_augment=False, pad_token_id=0,
            ctc_loss_reduction="mean", ctc_zero_infinity=True, do_stable_layer_norm=False, feat_extract_norm="group",
        )
        model = Wav2Vec2ForCTC(config)
        self.config = config
        self.features = Wav2Vec2Features(model)
        self.layers = stage_groups(model.wav2vec2.encoder.layers, stage_layers,
                                   lambda group: Wav2Vec2Layers(group, config), "Wav2Vec2CTC")
        self.head = Wav2Vec2Head(model.dropout, model.lm_head)

    @property
    def STAGES(self) -> list[str]:  # noqa: N802 - the models' common attribute name
        return ["features", *[f"layers.{i}" for i in range(len(self.layers))], "head"]

    def forward(self, input_values: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (batch, frames, vocab) and the frame mask."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_values, dtype=torch.long)
        hidden, frame_mask = self.features(input_values, attention_mask)
        for group in self.layers:
            hidden = group(hidden, frame_mask)
        return self.head(hidden), frame_mask

    def ctc_loss(self, logits: torch.Tensor, frame_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """CTC loss as ``Wav2Vec2ForCTC`` computes it (blank 0, mean over target lengths, infinite losses zeroed)."""
        targets = labels >= 0
        log_probs = F.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
        return F.ctc_loss(log_probs, labels.masked_select(targets), frame_mask.sum(-1), targets.sum(-1),
                          blank=self.config.pad_token_id, reduction="mean", zero_infinity=True)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits, frame_mask = self(batch["input_values"], batch.get("attention_mask"))
        return self.ctc_loss(logits, frame_mask, batch["labels"])
