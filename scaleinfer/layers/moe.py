"""Mixture-of-experts layers: the router's top-k choice and the experts' stacked weights.

Placement (parallel/expert.py): the experts are split over expert_parallel_size E groups of ranks, rank
ep_rank holding experts [ep_rank * M / E, (ep_rank + 1) * M / E) and loading only those; each of them is
sliced over the S = T / E ranks of its group like a Llama MLP (expert slicing, the paper's MoE tensor
parallelism): a 1/S part of the intermediate dimension, gate and up rows column-parallel, down columns
row-parallel. With E = 1 every rank runs every token through its slices and the partial outputs are
all-reduced once after the weighted sum; with E > 1 tokens travel to their experts' ranks and back by the
all-to-all of parallel/all_to_all.py.
"""

from __future__ import annotations

import torch
from torch import nn

from scaleinfer.kernels.dispatch import use_triton
from scaleinfer.kernels.moe import fused_moe
from scaleinfer.kernels.moe_router import route, route_ref, route_supported
from scaleinfer.layers.linear import _copy_checked, _divide
from scaleinfer.parallel.all_to_all import moe_all_to_all
from scaleinfer.parallel.comm import tp_all_reduce
from scaleinfer.parallel.expert import get_expert_state
from scaleinfer.parallel.state import get_parallel_state

W13_SHARDS = ("w1", "w3")  # gate rows, then up rows of w13_weight


def select_experts(router_logits: torch.Tensor, top_k: int,
                   renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [num_tokens, num_experts] -> (topk_weights [num_tokens, top_k] float32; topk_ids
    [num_tokens, top_k] int64). Softmax in float32 and the top k of it, renormalized to sum to 1 per token
    (HF Mixtral; Qwen-MoE with norm_topk_prob) or not (Qwen-MoE without). transformers 5 keeps Mixtral's
    weights in float32, and the expert outputs are scaled in float32 too. All on the device: no host sync.

    On the GPU one Triton launch (kernels/moe_router.py; up to MAX_EXPERTS experts and MAX_TOP_K, ties to the
    lowest expert index), else and past those bounds the torch ops (route_ref: torch.topk's order of ties)."""
    if use_triton(router_logits) and route_supported(router_logits, top_k):
        return route(router_logits, top_k, renormalize)
    return route_ref(router_logits, top_k, renormalize)


class FusedMoE(nn.Module):
    """num_experts gated-SiLU MLPs with stacked weights, run on the tokens the router sent each.

    w13_weight: [num_experts, 2 * intermediate / tp, hidden], each expert's gate rows then up rows (HF's
    w1 then w3); w2_weight: [num_experts, hidden, intermediate / tp] (HF's w2, the down projection).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.ep, state = get_expert_state(), get_parallel_state()
        # this rank's slice of each expert: of the TP group with E = 1, of its slice group else
        sliced = (state.tp_rank, state.tp_size) if self.ep.ep_size == 1 else (self.ep.slice_rank, self.ep.slice_size)
        self.tp_rank, self.tp_size = sliced
        self.num_local_experts = num_experts // self.ep.ep_size
        self.first_expert = self.ep.ep_rank * self.num_local_experts
        self.intermediate_size = _divide(intermediate_size, self.tp_size, "intermediate_size")
        size, local = self.intermediate_size, self.num_local_experts
        self.w13_weight = nn.Parameter(torch.empty(local, 2 * size, hidden_size), requires_grad=False)
        self.w13_weight.weight_loader = self.load_w13
        self.w2_weight = nn.Parameter(torch.empty(local, hidden_size, size), requires_grad=False)
        self.w2_weight.weight_loader = self.load_w2

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, hidden]; topk_weights, topk_ids: [num_tokens, top_k] -> [num_tokens, hidden]."""
        if self.ep.ep_size == 1:
            return tp_all_reduce(fused_moe(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids))
        return moe_all_to_all(x, topk_weights, topk_ids, self.num_local_experts, self.ep,
                              get_parallel_state().tp_group, self.local_experts)

    def local_experts(self, rows: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """rows: [R, hidden], local_ids: [R, 1] (-1: no expert) -> this rank's slice of each row's expert output."""
        ones = torch.ones(local_ids.shape, dtype=torch.float32, device=rows.device)
        return fused_moe(rows, self.w13_weight, self.w2_weight, ones, local_ids)

    def _local(self, expert: int) -> int | None:
        """A checkpoint expert's index among this rank's, None where another EP rank holds it."""
        local = expert - self.first_expert
        return local if 0 <= local < self.num_local_experts else None

    def load_w13(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[int, str] | None = None) -> None:
        """shard_id (expert, "w1" | "w3"): one expert's gate or up matrix, [intermediate, hidden]. None: the
        whole stack as transformers 5 holds it, [num_experts, 2 * intermediate, hidden], gate rows then up."""
        if shard_id is None:
            if loaded.dim() != 3 or loaded.shape[0] != param.shape[0] * self.ep.ep_size:
                raise ValueError(
                    f"checkpoint expert stack of shape {tuple(loaded.shape)} does not fit {tuple(param.shape)} "
                    f"x expert_parallel_size={self.ep.ep_size}"
                )
            for expert, full in enumerate(loaded.narrow(0, self.first_expert, self.num_local_experts)):
                for shard, rows in zip(W13_SHARDS, full.chunk(2), strict=True):
                    self.load_w13(param, rows, (self.first_expert + expert, shard))
            return
        expert, shard = self._local(shard_id[0]), shard_id[1]
        if expert is None:  # another EP rank's: never read from the mapped file
            return
        size = self.intermediate_size
        dst = param.data[expert].narrow(0, W13_SHARDS.index(shard) * size, size)
        _copy_checked(dst, loaded.narrow(0, self.tp_rank * size, size))

    def load_w2(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[int, str] | None = None) -> None:
        """shard_id (expert, "w2"): one expert's down matrix, [hidden, intermediate]. None: the whole stack,
        [num_experts, hidden, intermediate]."""
        size = self.intermediate_size
        if shard_id is None:
            local = loaded.narrow(0, self.first_expert, self.num_local_experts)
            _copy_checked(param.data, local.narrow(2, self.tp_rank * size, size))
            return
        expert = self._local(shard_id[0])
        if expert is not None:
            _copy_checked(param.data[expert], loaded.narrow(1, self.tp_rank * size, size))
