"""What every decoder family shares around its own layer stack: the LM head, logits, weight loading."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from scaleinfer.config import ArchConfig
from scaleinfer.layers.attention import AttentionMetadata
from scaleinfer.layers.embedding import ParallelLMHead
from scaleinfer.models.weights import load_into


class CausalLM(nn.Module):
    # checkpoint name fragment -> (our fused parameter fragment, shard id)
    stacked_params: dict[str, tuple[str, str | int]] = {}
    skip_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)

    def __init__(self, arch: ArchConfig, model: nn.Module) -> None:
        """model: the family's stack, with `embed_tokens`; called as model(input_ids, positions, meta)."""
        super().__init__()
        self.arch = arch
        self.model = model
        # The head maps back to the embedding width (narrower than hidden where a family projects it).
        self.lm_head = ParallelLMHead(arch.vocab_size, model.embed_tokens.weight.shape[1])
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> hidden states [num_tokens, hidden_size]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [num_seqs, hidden_size] -> float32 logits [num_seqs, vocab_size]."""
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        skip = self.skip_suffixes + (("lm_head.weight",) if self.arch.tie_word_embeddings else ())
        load_into(self, self.hf_weights(weights), self.stacked_params, skip)

    def hf_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint tensors under our names; a family whose checkpoint names differ overrides this."""
        yield from weights
