"""Qwen3-MoE: Qwen2-MoE (models/qwen2_moe.py) with what Qwen3-MoE does differently.

- q and k are RMS-normed per head (q_norm, k_norm over head_dim) before rope.
- No q/k/v biases (config attention_bias, false by default) and no shared expert.
"""

from __future__ import annotations

from scaleinfer.config import ArchConfig
from scaleinfer.layers.norm import RMSNorm
from scaleinfer.layers.rotary import RotaryEmbedding
from scaleinfer.models.llama import LlamaAttention
from scaleinfer.models.qwen2_moe import Qwen2MoeForCausalLM


class QKNormAttention(LlamaAttention):
    def __init__(self, arch: ArchConfig, rotary_emb: RotaryEmbedding, sliding_window: int | None = None) -> None:
        super().__init__(arch, rotary_emb, sliding_window)
        self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
        self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    attention = QKNormAttention
