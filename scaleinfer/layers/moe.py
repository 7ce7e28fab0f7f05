"""Mixture-of-experts layers: the router's top-k choice and the experts' stacked weights.

Expert slicing (the paper's MoE tensor parallelism): every rank holds every expert, each sliced like a
Llama MLP, a 1/tp part of the intermediate dimension (gate and up rows column-parallel, down columns
row-parallel); the partial outputs are all-reduced once after the weighted sum over the experts.
"""

from __future__ import annotations

import torch
from torch import nn

from scaleinfer.kernels.moe import fused_moe
from scaleinfer.layers.linear import _copy_checked, _divide
from scaleinfer.parallel.comm import tp_all_reduce
from scaleinfer.parallel.state import get_parallel_state

W13_SHARDS = ("w1", "w3")  # gate rows, then up rows of w13_weight


def select_experts(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [num_tokens, num_experts] -> (topk_weights [num_tokens, top_k] float32, summing to 1
    per token; topk_ids [num_tokens, top_k] int64). Softmax in float32, the top k renormalized, as HF Mixtral
    (transformers 5 keeps the weights in float32; the expert outputs are scaled in float32 too)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)
    return topk_weights / topk_weights.sum(dim=-1, keepdim=True), topk_ids


class FusedMoE(nn.Module):
    """num_experts gated-SiLU MLPs with stacked weights, run on the tokens the router sent each.

    w13_weight: [num_experts, 2 * intermediate / tp, hidden], each expert's gate rows then up rows (HF's
    w1 then w3); w2_weight: [num_experts, hidden, intermediate / tp] (HF's w2, the down projection).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        state = get_parallel_state()
        self.tp_rank, self.tp_size = state.tp_rank, state.tp_size
        self.intermediate_size = _divide(intermediate_size, self.tp_size, "intermediate_size")
        size = self.intermediate_size
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * size, hidden_size), requires_grad=False)
        self.w13_weight.weight_loader = self.load_w13
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, size), requires_grad=False)
        self.w2_weight.weight_loader = self.load_w2

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, hidden]; topk_weights, topk_ids: [num_tokens, top_k] -> [num_tokens, hidden]."""
        return tp_all_reduce(fused_moe(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids))

    def load_w13(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[int, str] | None = None) -> None:
        """shard_id (expert, "w1" | "w3"): one expert's gate or up matrix, [intermediate, hidden]. None: the
        whole stack as transformers 5 holds it, [num_experts, 2 * intermediate, hidden], gate rows then up."""
        if shard_id is None:
            if loaded.dim() != 3 or loaded.shape[0] != param.shape[0]:
                raise ValueError(
                    f"checkpoint expert stack of shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}"
                )
            for expert, full in enumerate(loaded):
                for shard, rows in zip(W13_SHARDS, full.chunk(2), strict=True):
                    self.load_w13(param, rows, (expert, shard))
            return
        expert, shard = shard_id
        size = self.intermediate_size
        dst = param.data[expert].narrow(0, W13_SHARDS.index(shard) * size, size)
        _copy_checked(dst, loaded.narrow(0, self.tp_rank * size, size))

    def load_w2(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[int, str] | None = None) -> None:
        """shard_id (expert, "w2"): one expert's down matrix, [hidden, intermediate]. None: the whole stack,
        [num_experts, hidden, intermediate]."""
        size = self.intermediate_size
        if shard_id is None:
            _copy_checked(param.data, loaded.narrow(2, self.tp_rank * size, size))
            return
        _copy_checked(param.data[shard_id[0]], loaded.narrow(1, self.tp_rank * size, size))
