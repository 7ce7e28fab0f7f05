"""Swap or recompute: what bringing a preempted sequence's KV back costs either way.

Swapping it back moves its KV bytes host to device (the swap-out overlaps the steps that follow); recomputing
runs its tokens through the model again as a prompt: the linear layers' 2 FLOPs per weight per token, and
attention's 4 FLOPs per query-key pair per query dimension (scores and the weighted sum) over the causal pairs.
Each at its rate; the cheaper wins. An estimate: recomputation at the matmul ceiling is its best case, so a
near tie goes to recompute.
"""

from __future__ import annotations

from dataclasses import dataclass

from scaleinfer.config import KV_OFFLOAD_RATES, ArchConfig, CacheConfig


@dataclass(slots=True, frozen=True)
class SwapCost:
    kv_bytes_per_token: int  # every layer's K and V of one token, the whole model (all ranks)
    linear_flops_per_token: float
    attention_flops_per_pair: float  # per (query, key) pair, all layers
    h2d_bytes_per_s: float
    flops_per_s: float

    @classmethod
    def for_model(cls, arch: ArchConfig, cache: CacheConfig, kv_itemsize: int, device_type: str) -> SwapCost:
        """device_type: "cuda" or "cpu", whose KV_OFFLOAD_RATES stand in for rates the config leaves unset."""
        h2d_gb_s, tflop_s = KV_OFFLOAD_RATES["cuda" if device_type == "cuda" else "cpu"]
        kv_bytes = 2 * arch.num_hidden_layers * arch.kv_size * kv_itemsize
        return cls(kv_bytes_per_token=kv_bytes, linear_flops_per_token=2.0 * linear_weights(arch),
                   attention_flops_per_pair=4.0 * arch.num_hidden_layers * arch.q_size,
                   h2d_bytes_per_s=(cache.kv_offload_h2d_gb_s or h2d_gb_s) * 1e9,
                   flops_per_s=(cache.kv_offload_tflop_s or tflop_s) * 1e12)

    def swap_seconds(self, num_tokens: int) -> float:
        return num_tokens * self.kv_bytes_per_token / self.h2d_bytes_per_s

    def recompute_seconds(self, num_tokens: int) -> float:
        num_pairs = num_tokens * (num_tokens + 1) // 2
        return (num_tokens * self.linear_flops_per_token + num_pairs * self.attention_flops_per_pair) / self.flops_per_s

    def prefers_swap(self, num_tokens: int) -> bool:
        return num_tokens > 0 and self.swap_seconds(num_tokens) < self.recompute_seconds(num_tokens)


def linear_weights(arch: ArchConfig) -> int:
    """Weights one token multiplies through the decoder layers: attention's projections and the MLP (gated, three
    matrices; a mixture of experts' routed top-k and its shared expert). The LM head is left out: a recomputed
    prompt samples nothing."""
    hidden = arch.hidden_size
    attention = hidden * (2 * arch.q_size + 2 * arch.kv_size)
    total = 0
    for layer in range(arch.num_hidden_layers):
        if arch.is_moe_layer(layer):
            mlp = 3 * hidden * (arch.num_experts_per_tok * arch.expert_intermediate_size
                                + arch.shared_expert_intermediate_size)
        else:
            mlp = 3 * hidden * arch.intermediate_size
        total += attention + mlp
    return total
