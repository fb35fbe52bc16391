"""GPT-Neo (``transformers``' blocks, random init) as a causal LM cut into stages: embeddings, groups of blocks, final
norm + LM head."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_distqat._quiet import quiet_transformers
from lightning_distqat.models.common import SequenceModel, stage_groups

__all__ = ["GPTNeoLM"]


class GPTNeoEmbeddings(nn.Module):
    """Token and position embeddings (positions ``0 .. T-1``), as ``GPTNeoModel`` adds them."""

    def __init__(self, wte: nn.Embedding, wpe: nn.Embedding, drop: nn.Module) -> None:
        super().__init__()
        self.wte, self.wpe, self.drop = wte, wpe, drop

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return self.drop(self.wte(input_ids) + self.wpe(positions))


class GPTNeoBlocks(nn.Module):
    """Consecutive GPT-Neo blocks. Takes the hidden states and the (batch, seq) 0/1 padding mask, builds the causal
    mask the way ``GPTNeoModel`` does (``transformers.masking_utils.create_causal_mask``) and returns the hidden
    states: the mask crosses the wire as integers, never as a quantizable float tensor."""

    def __init__(self, blocks: Sequence[nn.Module], config: Any) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.config = config

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with quiet_transformers():
            from transformers.masking_utils import create_causal_mask

        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=None, position_ids=positions)
        for block in self.blocks:
            hidden = block(hidden, attention_mask=mask)[0]
        return hidden


class GPTNeoHead(nn.Module):
    """Final layer norm and the LM head (untied from the token embeddings: they live in another stage)."""

    def __init__(self, ln_f: nn.Module, lm_head: nn.Linear) -> None:
        super().__init__()
        self.ln_f, self.lm_head = ln_f, lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(hidden))


class GPTNeoLM(SequenceModel):
    """A GPT-Neo causal LM from a ``GPTNeoConfig`` with random init. Stages: ``embed``, ``blocks.<i>`` (the groups of
    ``stage_layers`` consecutive blocks) and ``head``.

    The input and output embeddings are untied (``tie_word_embeddings=False``): tied, they would be one parameter in
    two stages, which the strategy refuses. Batches are the data server's ``causal_lm`` batches (``input_ids``,
    ``attention_mask``, ``labels`` with -100 on padding); the loss is next-token cross-entropy. Dropout defaults to 0
    (the experts' random streams differ from the trainer's)."""

    def __init__(self, vocab_size: int = 257, hidden_size: int = 64, num_heads: int = 4,
                 stage_layers: Sequence[int] = (2, 2), max_position_embeddings: int = 256, window_size: int = 256,
                 attention_types: Optional[list] = None, dropout: float = 0.0, lr: float = 3e-4,
                 weight_decay: float = 0.0) -> None:
        super().__init__()
        with quiet_transformers():
            from transformers import GPTNeoConfig, GPTNeoForCausalLM

        self.save_hyperparameters()
        layers = int(sum(int(n) for n in stage_layers))
        config = GPTNeoConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, num_layers=layers, num_heads=num_heads,
            max_position_embeddings=max_position_embeddings, window_size=window_size,
            attention_types=attention_types or [[["global", "local"], (layers + 1) // 2]],
            embed_dropout=dropout, attention_dropout=dropout, resid_dropout=dropout, tie_word_embeddings=False,
            attn_implementation="eager", bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1,
        )
        config.attention_layers = config.attention_layers[:layers]
        model = GPTNeoForCausalLM(config)
        t = model.transformer
        self.config = config
        self.embed = GPTNeoEmbeddings(t.wte, t.wpe, t.drop)
        self.blocks = stage_groups(t.h, stage_layers, lambda group: GPTNeoBlocks(group, config), "GPTNeoLM")
        self.head = GPTNeoHead(t.ln_f, model.lm_head)

    @property
    def STAGES(self) -> list[str]:  # noqa: N802 - the models' common attribute name
        return ["embed", *[f"blocks.{i}" for i in range(len(self.blocks))], "head"]

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.embed(input_ids)
        for group in self.blocks:
            hidden = group(hidden, attention_mask)
        return self.head(hidden)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-token cross-entropy (labels are -100 on padding)."""
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=-100)
