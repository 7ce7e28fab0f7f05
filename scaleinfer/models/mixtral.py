"""Mixtral: the Llama layers with each MLP replaced by a sparse mixture of experts.

Each token's MLP output is the router-weighted sum of its top num_experts_per_tok experts (layers/moe.py).
Checkpoints name the experts two ways, both loaded:
- as released and as transformers 5 saves them: `block_sparse_moe.gate.weight` [num_experts, hidden] and
  `block_sparse_moe.experts.{e}.w1|w2|w3.weight`, one matrix per expert (w1 gate, w3 up, w2 down);
- as transformers 5 holds them in memory (init_inference): `mlp.gate.weight`, `mlp.experts.gate_up_proj`
  [num_experts, 2 * intermediate, hidden] (gate rows then up) and `mlp.experts.down_proj`
  [num_experts, hidden, intermediate].
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from scaleinfer.config import ArchConfig
from scaleinfer.errors import ModelLoadError
from scaleinfer.layers.linear import ReplicatedLinear
from scaleinfer.layers.moe import FusedMoE, select_experts
from scaleinfer.models.causal_lm import CausalLM
from scaleinfer.models.llama import LlamaForCausalLM, LlamaModel

# checkpoint name fragment -> ours, applied in order
RENAMES = (
    (".block_sparse_moe.", ".mlp."),
    (".experts.gate_up_proj", ".experts.w13_weight"),
    (".experts.down_proj", ".experts.w2_weight"),
)


class MixtralMoE(nn.Module):
    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.top_k = arch.num_experts_per_tok
        self.gate = ReplicatedLinear(arch.hidden_size, arch.num_local_experts, bias=False)  # the router
        self.experts = FusedMoE(arch.num_local_experts, arch.hidden_size, arch.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, hidden] -> [num_tokens, hidden]."""
        topk_weights, topk_ids = select_experts(self.gate(x), self.top_k)  # each [num_tokens, top_k]
        return self.experts(x, topk_weights, topk_ids)


class MixtralForCausalLM(LlamaForCausalLM):
    def __init__(self, arch: ArchConfig) -> None:
        if not arch.num_local_experts:
            raise ModelLoadError(f"{arch.architecture}: the config has no num_local_experts")
        if arch.hidden_act != "silu":
            raise ModelLoadError(f"Mixtral with hidden_act {arch.hidden_act!r} is not supported (silu is)")
        CausalLM.__init__(self, arch, LlamaModel(arch, MixtralMoE))
        self.stacked_params = {**LlamaForCausalLM.stacked_params, **expert_shards(arch.num_local_experts)}

    def hf_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            for old, new in RENAMES:
                name = name.replace(old, new)
            yield name, tensor


def expert_shards(num_experts: int) -> dict[str, tuple[str, tuple[int, str]]]:
    """`.experts.{e}.w1.weight` -> (our stacked parameter, (e, "w1")) for every expert and matrix."""
    stacked = {"w1": ".experts.w13_weight", "w3": ".experts.w13_weight", "w2": ".experts.w2_weight"}
    return {f".experts.{e}.{w}.weight": (param, (e, w)) for e in range(num_experts) for w, param in stacked.items()}
