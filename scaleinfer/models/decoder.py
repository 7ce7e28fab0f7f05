"""The LayerNorm decoder skeleton that GPT-2, GPT-NeoX and OPT share; each family states only what differs.

Blocks with biased fused QKV, an ungated MLP (GELU or ReLU), and one of three residual layouts: pre-LN
sequential (x + attn(ln1(x)), then + mlp(ln2(.))), pre-LN parallel (x + attn(ln1(x)) + mlp(ln2(x))), or
post-LN (ln1(x + attn(x)), then ln2(. + mlp(.)), OPT-350m). A family subclass sets `position_offset`
(a learned position table, read at position + offset) or keeps None for a rotary table, and maps its
checkpoint names onto ours in `hf_weights`, splitting a fused QKV tensor into q, k, v shards. Embeddings
narrower than hidden (ArchConfig.word_embed_proj_dim) are projected in after the lookup and out before
the head.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from scaleinfer.config import ArchConfig
from scaleinfer.errors import ModelLoadError
from scaleinfer.layers.attention import Attention, AttentionMetadata
from scaleinfer.layers.embedding import VocabParallelEmbedding
from scaleinfer.layers.layernorm import LayerNorm
from scaleinfer.layers.linear import ColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from scaleinfer.layers.rotary import RotaryEmbedding
from scaleinfer.models.causal_lm import CausalLM, stage_layer_list
from scaleinfer.parallel.pipeline import current_stage

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": partial(F.gelu, approximate="none"),
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}
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


class DecoderMLP(nn.Module):
    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        if arch.hidden_act not in ACTIVATIONS:
            raise ModelLoadError(f"hidden_act {arch.hidden_act!r} is not supported ({', '.join(ACTIVATIONS)})")
        self.act_fn = ACTIVATIONS[arch.hidden_act]
        self.fc_in = ColumnParallelLinear(arch.hidden_size, arch.intermediate_size, bias=True)
        self.fc_out = RowParallelLinear(arch.intermediate_size, arch.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act_fn(self.fc_in(x)))


class DecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, rotary_emb: RotaryEmbedding | None) -> None:
        super().__init__()
        self.parallel_residual = arch.use_parallel_residual
        self.norm_before = arch.do_layer_norm_before
        self.input_layernorm = LayerNorm(arch.hidden_size, arch.layer_norm_eps)
        self.self_attn = DecoderAttention(arch, rotary_emb)
        self.post_attention_layernorm = LayerNorm(arch.hidden_size, arch.layer_norm_eps)
        self.mlp = DecoderMLP(arch)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if not self.norm_before:
            x = self.input_layernorm(x + self.self_attn(positions, x, meta))
            return self.post_attention_layernorm(x + self.mlp(x))
        attn = self.self_attn(positions, self.input_layernorm(x), meta)
        if self.parallel_residual:
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    stage_tensors = 1  # between pipeline stages: x
    def __init__(self, arch: ArchConfig, position_offset: int | None) -> None:
        """position_offset: None for rotary positions, else the learned table's row of position 0. Builds this
        rank's pipeline stage: its layers, the embeddings (and projection in) on the first stage, the final norm
        (and projection out) on the last."""
        super().__init__()
        stage = self.stage = current_stage(arch.num_hidden_layers)
        embed_dim = arch.word_embed_proj_dim or arch.hidden_size
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, embed_dim) if stage.is_first else None
        self.project_in = self.project_out = None
        if embed_dim != arch.hidden_size:
            self.project_in = ReplicatedLinear(embed_dim, arch.hidden_size, bias=False) if stage.is_first else None
            self.project_out = ReplicatedLinear(arch.hidden_size, embed_dim, bias=False) if stage.is_last else None
        self.position_offset, self.embed_positions, rotary_emb = position_offset, None, None
        if position_offset is not None and stage.is_first:
            num_positions = arch.max_position_embeddings + position_offset
            self.embed_positions = VocabParallelEmbedding(num_positions, arch.hidden_size)
        elif position_offset is None:  # one table for every layer
            rotary_emb = RotaryEmbedding(arch.rotary_dim, arch.max_position_embeddings, arch.rope_theta,
                                         arch.rope_scaling)
        self.layers = stage_layer_list(stage, arch.num_hidden_layers, lambda i: DecoderLayer(arch, rotary_emb))
        self.stage_layers = tuple(self.layers[i] for i in stage.layers)
        # Post-LN blocks end in a norm already.
        has_norm = arch.do_layer_norm_before and stage.is_last
        self.norm = LayerNorm(arch.hidden_size, arch.layer_norm_eps) if has_norm else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """hidden: [1, num_tokens, hidden_size] from the previous pipeline stage (None on the first) -> the
        final hidden states on the last stage, else [1, num_tokens, hidden_size] for the next."""
        x = self._embed(input_ids, positions) if hidden is None else hidden[0]
        for layer in self.stage_layers:
            x = layer(positions, x, meta)
        if not self.stage.is_last:
            return x.unsqueeze(0)
        if self.norm is not None:
            x = self.norm(x)
        return x if self.project_out is None else self.project_out(x)

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [num_tokens, embed_dim]
        if self.project_in is not None:
            x = self.project_in(x)  # [num_tokens, hidden_size]
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions + self.position_offset)
        return x


class DecoderForCausalLM(CausalLM):
    supports_pipeline = True
    position_offset: int | None = None  # learned positions: the table row of position 0; None: rotary
    stacked_params = QKV_SHARDS
    # checkpoint name fragment -> ours, applied in order
    renames: tuple[tuple[str, str], ...] = ()

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__(arch, DecoderModel(arch, self.position_offset))

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
