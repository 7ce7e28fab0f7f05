"""Qwen2-MoE: Mixtral's skeleton (models/mixtral.py) with what Qwen2-MoE does differently.

- q/k/v carry biases (config qkv_bias, true by default); o_proj none.
- Many small experts, moe_intermediate_size wide; the top-k weights are renormalized only with
  norm_topk_prob (the one gating path of layers/moe.py's select_experts, renormalize as the config says).
- A shared expert beside the routed ones: a gated-SiLU MLP of shared_expert_intermediate_size that every
  token runs through, scaled by sigmoid(shared_expert_gate(x)) and added to the routed sum.
- Layers in mlp_only_layers, or whose index + 1 is not a multiple of decoder_sparse_step, have a dense
  intermediate_size MLP (ArchConfig.is_moe_layer).
- Checkpoint names: `mlp.gate.weight`, `mlp.experts.{e}.gate_proj|up_proj|down_proj.weight`,
  `mlp.shared_expert.*_proj.weight`, `mlp.shared_expert_gate.weight`; in memory (init_inference) transformers
  5's stacks `mlp.experts.gate_up_proj` / `down_proj`, as Mixtral's.
"""

from __future__ import annotations

from scaleinfer.models.mixtral import MixtralForCausalLM


class Qwen2MoeForCausalLM(MixtralForCausalLM):
    expert_names = ("gate_proj", "up_proj", "down_proj")
