"""The Llama family: Llama 2/3/3.1, Mistral, Qwen2 (q/k/v bias), SmolLM2.

Wiring only: every layer knows its own tensor-parallel shard and the KV cache it writes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from scaleinfer.config import ArchConfig
from scaleinfer.layers.activation import SiluAndMul
from scaleinfer.layers.attention import Attention, AttentionMetadata
from scaleinfer.layers.embedding import VocabParallelEmbedding
from scaleinfer.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from scaleinfer.layers.norm import RMSNorm
from scaleinfer.layers.rotary import RotaryEmbedding
from scaleinfer.models.causal_lm import CausalLM, stage_layer_list
from scaleinfer.parallel.pipeline import current_stage


class LlamaAttention(nn.Module):
    def __init__(self, arch: ArchConfig, rotary_emb: RotaryEmbedding, sliding_window: int | None = None) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            arch.hidden_size, arch.head_dim, arch.num_attention_heads, arch.num_key_value_heads, arch.attention_bias
        )
        heads, kv_heads, head_dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, arch.head_dim
        self.o_proj = RowParallelLinear(arch.num_attention_heads * head_dim, arch.hidden_size)
        self.attn = Attention(heads, kv_heads, head_dim, head_dim**-0.5, rotary_emb, sliding_window)
        self.split = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        self.q_norm = self.k_norm = None  # a family's per-head norms of q and k before rope (Qwen3, Gemma 3)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens, head_dim = x.shape[0], self.attn.head_dim
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q.reshape(-1, head_dim)), self.k_norm(k.reshape(-1, head_dim))
        q = q.view(num_tokens, -1, head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.view(num_tokens, -1, head_dim)  # [num_tokens, num_kv_heads, head_dim]
        v = v.view(num_tokens, -1, head_dim)
        out = self.attn(positions, q, k, v, meta)
        return self.o_proj(out.view(num_tokens, -1))


class LlamaMLP(nn.Module):
    def __init__(self, arch: ArchConfig, intermediate_size: int | None = None) -> None:
        """intermediate_size: None for arch.intermediate_size (a shared expert has its own)."""
        super().__init__()
        size = intermediate_size or arch.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(arch.hidden_size, [size] * 2)
        self.down_proj = RowParallelLinear(size, arch.hidden_size)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


# Builds a layer's MLP: [num_tokens, hidden] -> [num_tokens, hidden]; a family with another MLP (Mixtral's
# experts) passes its own. A mixture-of-experts model's dense layers (ArchConfig.is_moe_layer false) get LlamaMLP.
MLPFactory = Callable[[ArchConfig], nn.Module]
# Builds a layer's attention, called as LlamaAttention is; Qwen3-MoE passes one that norms q and k.
AttentionFactory = Callable[[ArchConfig, RotaryEmbedding, "int | None"], nn.Module]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, rotary_emb: RotaryEmbedding, sliding_window: int | None = None,
                 mlp: MLPFactory = LlamaMLP, attention: AttentionFactory = LlamaAttention) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = attention(arch, rotary_emb, sliding_window)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = mlp(arch)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    stage_tensors = 2  # between pipeline stages: x and the residual
    def __init__(self, arch: ArchConfig, mlp: MLPFactory = LlamaMLP,
                 attention: AttentionFactory = LlamaAttention) -> None:
        """Builds this rank's pipeline stage: its layers, the embedding on the first, the norm on the last."""
        super().__init__()
        stage = current_stage(arch.num_hidden_layers)
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size) if stage.is_first else None
        # One table of cos/sin for every layer: at a 128k context it is 64 MB.
        rotary_emb = RotaryEmbedding(arch.rotary_dim, arch.max_position_embeddings, arch.rope_theta,
                                     arch.rope_scaling)
        self.layers = stage_layer_list(stage, arch.num_hidden_layers,
                                       lambda i: LlamaDecoderLayer(arch, rotary_emb, arch.layer_window(i),
                                                                         layer_mlp(arch, i, mlp), attention))
        self.stage_layers = tuple(self.layers[i] for i in stage.layers)
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps) if stage.is_last else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """hidden: [2, num_tokens, hidden_size], x and the residual from the previous stage (None on the first).
        -> the normed hidden states [num_tokens, hidden_size] on the last stage, else [2, ...] for the next."""
        if hidden is None:
            x, residual = self.embed_tokens(input_ids), None  # [num_tokens, hidden_size]
        else:
            x, residual = hidden.unbind(0)
        for layer in self.stage_layers:
            x, residual = layer(positions, x, residual, meta)
        if self.norm is None:
            return torch.stack((x, residual))
        x, _ = self.norm(x, residual)
        return x


def layer_mlp(arch: ArchConfig, layer: int, mlp: MLPFactory) -> MLPFactory:
    """The family's MLP, or LlamaMLP on a mixture-of-experts model's dense layers."""
    return LlamaMLP if arch.num_local_experts and not arch.is_moe_layer(layer) else mlp


class LlamaForCausalLM(CausalLM):
    supports_pipeline = True
    stacked_params = {
        ".q_proj.": (".qkv_proj.", "q"),
        ".k_proj.": (".qkv_proj.", "k"),
        ".v_proj.": (".qkv_proj.", "v"),
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
    }

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__(arch, LlamaModel(arch))
