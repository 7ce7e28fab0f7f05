"""Gemma 2 and Gemma 3 (text): the Llama layers, with what Gemma does differently.

- Embeddings times sqrt(hidden_size), that factor rounded to the model dtype first (as HF).
- RMSNorm scales by (1 + weight), in float32; four per layer: the attention and MLP outputs are normed
  (post_attention, post_feedforward) before their residual adds, their inputs as usual (input,
  pre_feedforward).
- GeGLU MLP: gelu with the tanh approximation.
- Attention scale query_pre_attn_scalar**-0.5; layers that layer_types marks "sliding_attention" see
  the last sliding_window tokens only. Gemma 2 soft-caps attention scores and the final logits.
- Gemma 3 norms q and k per head before rope, and turns its sliding-window layers at their own rope base
  (rope_local_theta), the global ones at rope_theta with rope_scaling.
- Tied embeddings.
"""

from __future__ import annotations

import torch
from torch import nn

from scaleinfer.config import ArchConfig
from scaleinfer.errors import ModelLoadError
from scaleinfer.layers.activation import GeluTanhAndMul
from scaleinfer.layers.attention import Attention, AttentionMetadata
from scaleinfer.layers.embedding import VocabParallelEmbedding
from scaleinfer.layers.norm import RMSNorm
from scaleinfer.layers.rotary import RotaryEmbedding
from scaleinfer.models.causal_lm import CausalLM
from scaleinfer.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP

GELU_TANH_NAMES = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")
SLIDING = "sliding_attention"


def gemma_norm(arch: ArchConfig, size: int | None = None) -> RMSNorm:
    return RMSNorm(size or arch.hidden_size, arch.rms_norm_eps, weight_offset=1.0)


class GemmaAttention(LlamaAttention):
    def __init__(self, arch: ArchConfig, rotary_emb: RotaryEmbedding, sliding_window: int | None,
                 qk_norm: bool) -> None:
        super().__init__(arch, rotary_emb)
        heads, kv_heads, head_dim = self.attn.num_heads, self.attn.num_kv_heads, self.attn.head_dim
        scale = (arch.query_pre_attn_scalar or head_dim) ** -0.5
        self.attn = Attention(heads, kv_heads, head_dim, scale, rotary_emb, sliding_window,
                              arch.attn_logit_softcapping)
        if qk_norm:
            self.q_norm, self.k_norm = gemma_norm(arch, head_dim), gemma_norm(arch, head_dim)


class GemmaMLP(LlamaMLP):
    def __init__(self, arch: ArchConfig) -> None:
        super().__init__(arch)
        if arch.hidden_act not in GELU_TANH_NAMES:
            raise ModelLoadError(f"Gemma hidden_activation {arch.hidden_act!r} is not supported ({GELU_TANH_NAMES})")
        self.act_fn = GeluTanhAndMul()


class GemmaDecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, rotary_emb: RotaryEmbedding, sliding_window: int | None,
                 qk_norm: bool) -> None:
        super().__init__()
        self.input_layernorm = gemma_norm(arch)
        self.self_attn = GemmaAttention(arch, rotary_emb, sliding_window, qk_norm)
        self.post_attention_layernorm = gemma_norm(arch)
        self.pre_feedforward_layernorm = gemma_norm(arch)
        self.mlp = GemmaMLP(arch)
        self.post_feedforward_layernorm = gemma_norm(arch)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's normed MLP output, residual: the stream before it (None: x is the
        embedding). Returns the same pair for the next layer; their sum is this layer's output."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(positions, x, meta))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class GemmaModel(nn.Module):
    def __init__(self, arch: ArchConfig, qk_norm: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size)
        # A 0-dim tensor in the model dtype (the default while the model is built): rounded as HF rounds it.
        self.register_buffer("embed_scale", torch.tensor(arch.hidden_size**0.5), persistent=False)
        max_position = arch.max_position_embeddings
        global_rope = RotaryEmbedding(arch.head_dim, max_position, arch.rope_theta, arch.rope_scaling)
        local_rope = global_rope
        if arch.rope_local_theta is not None:
            local_rope = RotaryEmbedding(arch.head_dim, max_position, arch.rope_local_theta, None)
        sliding = [kind == SLIDING for kind in arch.layer_types] or [False] * arch.num_hidden_layers
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(arch, local_rope if s else global_rope, arch.sliding_window if s else None, qk_norm)
            for s in sliding
        )
        self.norm = gemma_norm(arch)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids) * self.embed_scale, None  # [num_tokens, hidden_size]
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


class Gemma2ForCausalLM(CausalLM):
    stacked_params = LlamaForCausalLM.stacked_params
    qk_norm = False

    def __init__(self, arch: ArchConfig) -> None:
        if arch.layer_types and arch.sliding_window is None and SLIDING in arch.layer_types:
            raise ModelLoadError(f"{arch.architecture}: layer_types has sliding layers but sliding_window is None")
        super().__init__(arch, GemmaModel(arch, self.qk_norm))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [num_seqs, hidden_size] -> float32 logits, soft-capped (in float32) when the model says."""
        logits = super().compute_logits(hidden)
        cap = self.arch.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    qk_norm = True
