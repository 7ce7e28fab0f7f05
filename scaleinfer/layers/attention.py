"""Paged attention layer and the metadata that describes one step's batch to it.

Tokens of a step are laid out decodes first (one token per sequence), then each prefill chunk
contiguously. The runner binds k_cache / v_cache to every layer once, after sizing the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from scaleinfer.kernels.paged_attention import paged_decode_attention, paged_prefill_attention, write_kv_cache


@dataclass(slots=True)
class PrefillChunk:
    query_start: int  # index of its first token in the step's flat token list
    num_query: int
    start_pos: int  # tokens of this sequence already in the cache
    block_table: torch.Tensor  # [num_blocks] int64


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] int64
    decode_context_lens: torch.Tensor | None  # [num_decodes] int64
    prefills: list[PrefillChunk] = field(default_factory=list)


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.k_cache = torch.empty(0)  # [num_blocks, block_size, num_kv_heads, head_dim], bound by the runner
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim] -> like q."""
        write_kv_cache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        if meta.num_decodes:
            out[: meta.num_decodes] = paged_decode_attention(
                q[: meta.num_decodes], self.k_cache, self.v_cache,
                meta.decode_block_tables, meta.decode_context_lens, self.scale,
            )
        for chunk in meta.prefills:
            rows = slice(chunk.query_start, chunk.query_start + chunk.num_query)
            out[rows] = paged_prefill_attention(
                q[rows], self.k_cache, self.v_cache, chunk.block_table, chunk.start_pos, self.scale
            )
        return out
