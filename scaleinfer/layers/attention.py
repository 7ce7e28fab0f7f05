"""Paged attention layer and the metadata that describes one step's batch to it.

Tokens of a step are laid out decodes first (one token per sequence), then each prefill chunk
contiguously. The runner binds k_cache / v_cache to every layer once, after sizing the cache. The layer
applies RoPE to q and k, writes k and v into their cache slots (one fused kernel, which also serves partial
rotary, GPT-NeoX, and none, GPT-2), then attends: with any scale, optionally a sliding window and
soft-capped scores (Gemma).

An FP8 cache (kv_cache_dtype="fp8") holds k / k_scale and v / v_scale with one scale each per layer: the
checkpoint's k_scale / v_scale where it has them (weights/quant_config.py maps their names), else 1.0, as vLLM
does. They are read to host floats once, when the cache is bound; a cache in the run dtype uses none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from scaleinfer.errors import ModelLoadError
from scaleinfer.kernels.decode_attention import decode_attention
from scaleinfer.kernels.prefill_attention import prefill_attention
from scaleinfer.kernels.rotary_kv import rotary_kv
from scaleinfer.layers.rotary import RotaryEmbedding


@dataclass(slots=True)
class PrefillMetadata:
    """The step's multi-token chunks, one row per sequence."""

    block_tables: torch.Tensor  # [num_prefills, max_blocks] int64
    query_start_loc: torch.Tensor  # [num_prefills + 1], offsets from the first prefill token
    start_pos: torch.Tensor  # [num_prefills]: tokens of each sequence already in the cache
    max_query_len: int
    # [num_prefills]: every token each sequence has (prompt and generated), of which this chunk may be a
    # part: LongRoPE (Phi-3) picks its rates from the whole length, as HF does.
    seq_lens: torch.Tensor | None = None


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] int64
    decode_context_lens: torch.Tensor | None  # [num_decodes] int64
    prefill: PrefillMetadata | None = None


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 rotary_emb: RotaryEmbedding | None, sliding_window: int | None = None,
                 logits_soft_cap: float | None = None) -> None:
        """sliding_window: a query at position p sees keys at positions > p - sliding_window only;
        logits_soft_cap: scores become cap * tanh(score / cap). None turns either off."""
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.rotary_emb = rotary_emb
        self.features = dict(sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
        if rotary_emb is None:  # cos/sin tables of rotary dim 0: the fused kernel only writes the cache
            self.register_buffer("no_rotation", torch.empty(1, 0, dtype=torch.float32), persistent=False)
        self.k_cache = torch.empty(0)  # [num_blocks, block_size, num_kv_heads, head_dim], bound by the runner
        self.v_cache = torch.empty(0)
        for name in ("k_scale", "v_scale"):  # loaded when the checkpoint has them, else 1.0
            self.register_buffer(name, torch.ones((), dtype=torch.float32))
            getattr(self, name).weight_loader = _load_scale
        self.cache_scales = (1.0, 1.0)  # what the kernels take: (k_scale, v_scale) of an FP8 cache

    def bind_kv_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """The layer's cache pages; an FP8 cache takes the layer's scales (one host read, at start)."""
        self.k_cache, self.v_cache = k_cache, v_cache
        fp8 = k_cache.dtype == torch.float8_e4m3fn
        self.cache_scales = (float(self.k_scale), float(self.v_scale)) if fp8 else (1.0, 1.0)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim] -> like q."""
        rope = self.rotary_emb
        cos, sin = (rope.cos_cache, rope.sin_cache) if rope is not None else (self.no_rotation, self.no_rotation)
        k_scale, v_scale = self.cache_scales
        rotary_kv(positions, q, k, v, cos, sin, self.k_cache, self.v_cache, meta.slot_mapping, k_scale, v_scale)
        out = torch.empty_like(q)
        n = meta.num_decodes
        if n:
            decode_attention(q[:n], self.k_cache, self.v_cache, meta.decode_block_tables, meta.decode_context_lens,
                             self.scale, out=out[:n], k_scale=k_scale, v_scale=v_scale, **self.features)
        if meta.prefill is not None:
            p = meta.prefill
            prefill_attention(q[n:], self.k_cache, self.v_cache, p.block_tables, p.query_start_loc, p.start_pos,
                              self.scale, max_query_len=p.max_query_len, out=out[n:], k_scale=k_scale,
                              v_scale=v_scale, **self.features)
        return out


def _load_scale(buffer: torch.Tensor, loaded: torch.Tensor) -> None:
    """A checkpoint's per-layer KV-cache scale: one number, [] or [1]."""
    if loaded.numel() != 1:
        raise ModelLoadError(f"a KV-cache scale of shape {tuple(loaded.shape)}: one number per layer expected")
    buffer.copy_(loaded.reshape(()))
