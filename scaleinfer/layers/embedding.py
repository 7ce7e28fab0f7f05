"""Token embedding and LM head, split over the vocabulary across tensor-parallel ranks.

Under a scheme that asks for it (`lm_head_int8`: a GGUF file's kept weights, whose embedding is itself Q8_0)
the table is int8 levels with one float32 scale per row (layers/quant_int8.py), kept as the weight's
`row_scale` attribute so that a tied LM head, which shares the weight, shares it too: a lookup scales its
rows, the head runs the int8 matmul (on a small model the head is a large share of a decode step's bytes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaleinfer.kernels.gemv import linear
from scaleinfer.layers.linear import current_scheme
from scaleinfer.layers.quant_int8 import int8_linear, quantize_rows
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
        self.dtype = torch.get_default_dtype()  # of the lookups' output
        int8 = getattr(current_scheme(), "lm_head_int8", False)
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size, dtype=torch.int8 if int8 else None),
                                   requires_grad=False)
        if int8:
            self.weight.row_scale = torch.ones(self.shard_size, dtype=torch.float32)  # [shard_size]
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        shard = loaded[self.vocab_start : self.vocab_start + self.shard_size]
        if shard.shape[1] != param.shape[1]:
            raise ValueError(f"embedding of shape {tuple(loaded.shape)} does not fit hidden size {param.shape[1]}")
        param.data.zero_()
        if param.dtype == torch.int8:
            levels, scale = quantize_rows(shard.to(param.device))
            param.row_scale[: shard.shape[0]].copy_(scale)
            shard = levels
        param.data[: shard.shape[0]].copy_(shard)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._lookup(input_ids)
        local = input_ids - self.vocab_start
        in_shard = (local >= 0) & (local < self.shard_size)
        out = self._lookup(local.clamp(0, self.shard_size - 1)) * in_shard.unsqueeze(-1)
        return tp_all_reduce(out)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [num_tokens] -> [num_tokens, hidden] in the run dtype."""
        if self.weight.dtype != torch.int8:
            return F.embedding(ids, self.weight)
        return F.embedding(ids, self.weight).to(self.dtype) * self.weight.row_scale[ids, None].to(self.dtype)

    def _apply(self, fn, recurse: bool = True):
        """.to(device) moves the row scales with the weight (they are its attribute, not a buffer)."""
        scale = getattr(self.weight, "row_scale", None)
        result = super()._apply(fn, recurse)
        if scale is not None:
            self.weight.row_scale = fn(scale)
        return result


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits; each rank computes its vocab slice, gathered to the full vocab."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Every rank gets the whole vocabulary's logits and samples the same tokens (the same seeds): no
        # token broadcast, and each rank can prepare its next decode step on its own.
        if self.weight.dtype == torch.int8:
            logits = tp_all_gather(int8_linear(hidden, self.weight, self.weight.row_scale))
        else:
            logits = tp_all_gather(linear(hidden, self.weight))  # [num_tokens, tp_size * shard_size]
        return logits[:, : self.vocab_size]
