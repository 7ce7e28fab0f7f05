"""Token embedding and LM head, split over the vocabulary across tensor-parallel ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaleinfer.kernels.gemv import linear
from scaleinfer.parallel.comm import tp_all_gather, tp_all_reduce
from scaleinfer.parallel.state import get_parallel_state


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        state = get_parallel_state()
        self.tp_rank, self.tp_size = state.tp_rank, state.tp_size
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // self.tp_size)  # ceil: the last shard may be padded
        self.vocab_start = self.tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        shard = loaded[self.vocab_start : self.vocab_start + self.shard_size]
        if shard.shape[1] != param.shape[1]:
            raise ValueError(f"embedding of shape {tuple(loaded.shape)} does not fit hidden size {param.shape[1]}")
        param.data.zero_()
        param.data[: shard.shape[0]].copy_(shard)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        in_shard = (local >= 0) & (local < self.shard_size)
        out = F.embedding(local.clamp(0, self.shard_size - 1), self.weight) * in_shard.unsqueeze(-1)
        return tp_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits; each rank computes its vocab slice, gathered to the full vocab."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Every rank gets the whole vocabulary's logits and samples the same tokens (the same seeds): no
        # token broadcast, and each rank can prepare its next decode step on its own.
        logits = tp_all_gather(linear(hidden, self.weight))  # [num_tokens, tp_size * shard_size]
        return logits[:, : self.vocab_size]
