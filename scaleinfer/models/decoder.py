"""The LayerNorm decoder skeleton that GPT-2 and GPT-NeoX share; each family states only what differs.

Pre-LN blocks with biased fused QKV, a GELU MLP without gate, and either the sequential residual
(x + attn(ln1(x)), then + mlp(ln2(.))) or the parallel one (x + attn(ln1(x)) + mlp(ln2(x))). A family
subclass sets `absolute_positions` (learned position table) or a rotary table, and maps its checkpoint
names onto ours in `hf_weights`, splitting its fused QKV tensor into q, k, v shards.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from scaleinfer.config import ArchConfig
from scaleinfer.errors import ModelLoadError
from scaleinfer.layers.attention import Attention, AttentionMetadata
from scaleinfer.layers.embedding import VocabParallelEmbedding
from scaleinfer.layers.layernorm import LayerNorm
from scaleinfer.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from scaleinfer.layers.rotary import RotaryEmbedding
from scaleinfer.models.causal_lm import CausalLM

# hidden_act -> F.gelu's `approximate`
GELU_APPROXIMATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
QKV_SHARDS = {".q_proj.": (".qkv_proj.", "q"), ".k_proj.": (".qkv_proj.", "k"), ".v_proj.": (".qkv_proj.", "v")}


class DecoderAttention(nn.Module):
    def __init__(self, arch: ArchConfig, rotary_emb: RotaryEmbedding | None) -> None:
        super().__init__()
        heads, head_dim = arch.num_attention_heads, arch.head_dim
        self.qkv_proj = QKVParallelLinear(arch.hidden_size, head_dim, heads, heads, bias=True)
        self.o_proj = RowParallelLinear(heads * head_dim, arch.hidden_size, bias=True)
        local_heads = self.qkv_proj.num_heads
        self.attn = Attention(local_heads, local_heads, head_dim, head_dim**-0.5, rotary_emb)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens, head_dim = x.shape[0], self.attn.head_dim
        q, k, v = self.qkv_proj(x).view(num_tokens, 3, -1, head_dim).unbind(1)  # each [num_tokens, heads, head_dim]
        out = self.attn(positions, q, k, v, meta)
        return self.o_proj(out.reshape(num_tokens, -1))


class GeluMLP(nn.Module):
    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        if arch.hidden_act not in GELU_APPROXIMATIONS:
            raise ModelLoadError(f"hidden_act {arch.hidden_act!r} is not supported ({', '.join(GELU_APPROXIMATIONS)})")
        self.approximate = GELU_APPROXIMATIONS[arch.hidden_act]
        self.fc_in = ColumnParallelLinear(arch.hidden_size, arch.intermediate_size, bias=True)
        self.fc_out = RowParallelLinear(arch.intermediate_size, arch.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x), approximate=self.approximate))


class DecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, rotary_emb: RotaryEmbedding | None) -> None:
        super().__init__()
        self.parallel_residual = arch.use_parallel_residual
        self.input_layernorm = LayerNorm(arch.hidden_size, arch.layer_norm_eps)
        self.self_attn = DecoderAttention(arch, rotary_emb)
        self.post_attention_layernorm = LayerNorm(arch.hidden_size, arch.layer_norm_eps)
        self.mlp = GeluMLP(arch)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        attn = self.self_attn(positions, self.input_layernorm(x), meta)
        if self.parallel_residual:
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, arch: ArchConfig, absolute_positions: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size)
        self.embed_positions = None
        rotary_emb = None
        if absolute_positions:
            self.embed_positions = VocabParallelEmbedding(arch.max_position_embeddings, arch.hidden_size)
        else:  # one table for every layer
            rotary_emb = RotaryEmbedding(arch.rotary_dim, arch.max_position_embeddings, arch.rope_theta,
                                         arch.rope_scaling)
        self.layers = nn.ModuleList(DecoderLayer(arch, rotary_emb) for _ in range(arch.num_hidden_layers))
        self.norm = LayerNorm(arch.hidden_size, arch.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [num_tokens, hidden_size]
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions)
        for layer in self.layers:
            x = layer(positions, x, meta)
        return self.norm(x)


class DecoderForCausalLM(CausalLM):
    absolute_positions = False
    stacked_params = QKV_SHARDS
    # checkpoint name fragment -> ours, applied in order
    renames: tuple[tuple[str, str], ...] = ()

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__(arch, DecoderModel(arch, self.absolute_positions))

    def hf_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint tensors under our names; the fused QKV tensor as q_proj, k_proj, v_proj parts."""
        for name, tensor in weights:
            for old, new in self.renames:
                name = name.replace(old, new)
            tensor = self.to_linear_layout(name, tensor)
            if ".qkv_proj." not in name:
                yield name, tensor
                continue
            for part, shard in zip((".q_proj.", ".k_proj.", ".v_proj."), self.split_qkv(tensor), strict=True):
                yield name.replace(".qkv_proj.", part), shard

    def to_linear_layout(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A checkpoint tensor in nn.Linear's [out, in] layout; the family overrides where it differs."""
        return tensor

    def split_qkv(self, fused: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """fused: [3 * hidden, ...] laid out q, k, v -> (q, k, v); the family overrides other layouts."""
        return fused.chunk(3, dim=0)
