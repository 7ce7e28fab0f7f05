"""Mixtral: the Llama layers with each MLP replaced by a sparse mixture of experts (the MoE families' base).

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
from scaleinfer.models.llama import AttentionFactory, LlamaAttention, LlamaForCausalLM, LlamaMLP, LlamaModel

# checkpoint name fragment -> ours, applied in order
RENAMES = (
    (".block_sparse_moe.", ".mlp."),
    (".experts.gate_up_proj", ".experts.w13_weight"),
    (".experts.down_proj", ".experts.w2_weight"),
)


class SparseMoeBlock(nn.Module):
    """The sparse MoE MLP of every MoE family: the router's top k of the experts (renormalized where the
    config says: Mixtral always, Qwen-MoE with norm_topk_prob), and where the config has one a shared expert
    every token runs through, scaled by sigmoid(shared_expert_gate(x)) (Qwen2-MoE)."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.top_k, self.renormalize = arch.num_experts_per_tok, arch.norm_topk_prob
        self.gate = ReplicatedLinear(arch.hidden_size, arch.num_local_experts, bias=False)  # the router
        self.experts = FusedMoE(arch.num_local_experts, arch.hidden_size, arch.expert_intermediate_size)
        self.shared_expert = self.shared_expert_gate = None
        if arch.shared_expert_intermediate_size:
            self.shared_expert = LlamaMLP(arch, arch.shared_expert_intermediate_size)
            self.shared_expert_gate = ReplicatedLinear(arch.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, hidden] -> [num_tokens, hidden]."""
        router_logits = self.gate(x)  # [num_tokens, num_experts]
        topk_weights, topk_ids = select_experts(router_logits, self.top_k, self.renormalize)  # [num_tokens, top_k]
        out = self.experts(x, topk_weights, topk_ids)
        if self.shared_expert is None:
            return out
        return out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class MixtralForCausalLM(LlamaForCausalLM):
    # the checkpoint's names of each expert's gate, up and down matrices
    expert_names: tuple[str, str, str] = ("w1", "w3", "w2")
    attention: AttentionFactory = LlamaAttention

    def __init__(self, arch: ArchConfig) -> None:
        if not arch.num_local_experts:
            raise ModelLoadError(f"{arch.architecture}: the config has no num_local_experts")
        if arch.hidden_act != "silu":
            raise ModelLoadError(f"{arch.architecture} with hidden_act {arch.hidden_act!r} is not supported (silu is)")
        CausalLM.__init__(self, arch, LlamaModel(arch, SparseMoeBlock, type(self).attention))
        # the experts' names first: Qwen-MoE's `.experts.{e}.gate_proj.` also holds Llama's `.gate_proj.`
        self.stacked_params = {**expert_shards(arch.num_local_experts, self.expert_names),
                               **LlamaForCausalLM.stacked_params}

    def hf_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            for old, new in RENAMES:
                name = name.replace(old, new)
            yield name, tensor


def expert_shards(num_experts: int, names: tuple[str, str, str] = ("w1", "w3", "w2"),
                  ) -> dict[str, tuple[str, tuple[int, str]]]:
    """`.experts.{e}.{name}.weight` -> (our stacked parameter, (e, "w1" | "w3" | "w2")) for every expert and
    matrix; names: the checkpoint's gate, up and down names (Mixtral's w1, w3, w2; Qwen-MoE's gate_proj, ...)."""
    ours = {"w1": ".experts.w13_weight", "w3": ".experts.w13_weight", "w2": ".experts.w2_weight"}
    return {f".experts.{e}.{name}.weight": (ours[w], (e, w))
            for e in range(num_experts) for name, w in zip(names, ours, strict=True)}
