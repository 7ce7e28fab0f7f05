"""Attention over the paged KV cache: write new K/V into their slots, attend over a sequence's blocks.

Cache layout, per layer: k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]; token t of a
sequence lives in block block_table[t // block_size] at offset t % block_size, i.e. slot
block_table[t // block_size] * block_size + t % block_size. These are the torch references; the GPU
kernels replace them one by one and are tested against them.

Every attention takes a scale (any value: Gemma's is query_pre_attn_scalar**-0.5), an optional sliding
window (a query at position p sees keys at positions > p - window only) and optional soft-capping of the
scores (cap * tanh(score / cap), applied before the mask); None turns a feature off.

An FP8 cache (float8_e4m3fn, kv_cache_dtype="fp8") holds k / k_scale and v / v_scale, saturated at +-448, with
one scale per layer (vLLM's convention: stored * scale is the value); a cache in the activations' dtype
ignores the scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_CACHE_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_CACHE_DTYPE).max)


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    """k, v: [num_tokens, num_kv_heads, head_dim]; slot_mapping: [num_tokens] int64."""
    num_kv_heads, head_dim = k.shape[1:]
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        stored = _as_bytes(to_cache(x, cache.dtype, scale))  # CPU index ops take no fp8: their bytes are copied
        _as_bytes(cache).view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, stored)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8_CACHE_DTYPE else t


def to_cache(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x as a cache of `dtype` stores it: as it is, or for FP8 x / scale saturated to e4m3's range."""
    if dtype != FP8_CACHE_DTYPE:
        return x
    return (x.float() * (1.0 / scale)).clamp_(-FP8_MAX, FP8_MAX).to(dtype)  # the kernels multiply by 1 / scale


def from_cache(kv: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Cached values (gathered) back in the activations' dtype."""
    return kv if kv.dtype == dtype else (kv.float() * scale).to(dtype)


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """block_tables: [num_seqs, max_blocks] -> [num_seqs, num_kv_heads, max_blocks * block_size, head_dim]."""
    num_seqs, max_blocks = block_tables.shape
    # index_select over whole blocks is about twice as fast on CPU as advanced indexing (of an FP8 cache, its bytes)
    kv = _as_bytes(cache).flatten(1).index_select(0, block_tables.flatten()).view(cache.dtype)
    # kv: [num_seqs * max_blocks, block elems]
    kv = kv.view(num_seqs, max_blocks * cache.shape[1], *cache.shape[2:])  # [num_seqs, len, kv_heads, dim]
    return kv.transpose(1, 2)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
    logits_soft_cap: float | None = None,
) -> torch.Tensor:
    """q: [batch, num_heads, num_query, head_dim]; k, v: [batch, num_kv_heads, num_keys, head_dim]; mask:
    broadcastable to [batch, num_heads, num_query, num_keys], True where visible (None: causal) -> like q."""
    if logits_soft_cap is None:
        causal = mask is None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale  # [batch, num_heads, num_query, num_keys]
    scores = torch.tanh(scores / logits_soft_cap) * logits_soft_cap
    if mask is None:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1).to(v.dtype) @ v).to(q.dtype)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """One query token per sequence, at position context_len - 1.
    q: [num_seqs, num_heads, head_dim] -> [num_seqs, num_heads, head_dim]."""
    k = from_cache(gather_kv(k_cache, block_tables), q.dtype, k_scale)  # [num_seqs, num_kv_heads, max_len, head_dim]
    v = from_cache(gather_kv(v_cache, block_tables), q.dtype, v_scale)
    key_pos = torch.arange(k.shape[2], device=q.device)[None, :]
    mask = key_pos < context_lens[:, None]  # [num_seqs, max_len]
    if sliding_window is not None:
        mask &= key_pos >= context_lens[:, None] - sliding_window
    out = attend(q.unsqueeze(2), k, v, mask[:, None, None, :], scale, logits_soft_cap)
    return out.squeeze(2)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    start_pos: int,
    scale: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """A chunk of one sequence, causal, over its cached context and itself.

    q: [num_query, num_heads, head_dim] for positions start_pos.. -> [num_query, num_heads, head_dim].
    """
    num_query = q.shape[0]
    context_len = start_pos + num_query
    k = gather_kv(k_cache, block_table[None])[:, :, :context_len]  # [1, num_kv_heads, context_len, head_dim]
    v = gather_kv(v_cache, block_table[None])[:, :, :context_len]
    k, v = from_cache(k, q.dtype, k_scale), from_cache(v, q.dtype, v_scale)
    q = q.transpose(0, 1).unsqueeze(0)  # [1, num_heads, num_query, head_dim]
    mask = None  # causal from key 0
    if start_pos > 0 or sliding_window is not None:
        query_pos = torch.arange(start_pos, context_len, device=q.device)[:, None]
        key_pos = torch.arange(context_len, device=q.device)[None, :]
        mask = key_pos <= query_pos  # [num_query, context_len]
        if sliding_window is not None:
            mask &= key_pos > query_pos - sliding_window
    out = attend(q, k, v, mask, scale, logits_soft_cap)
    return out[0].transpose(0, 1)


def paged_prefill_attention_varlen(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    start_pos: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Chunks of several sequences, one after another, each as paged_prefill_attention.

    q: [num_tokens, num_heads, head_dim], sequence i's chunk at rows query_start_loc[i]:query_start_loc[i + 1]
    for its positions start_pos[i]..; block_tables: [num_seqs, max_blocks] -> [num_tokens, num_heads, head_dim].
    """
    out = torch.empty_like(q)
    bounds, starts = query_start_loc.tolist(), start_pos.tolist()
    for i, (first, last) in enumerate(zip(bounds[:-1], bounds[1:])):
        if last > first:
            rows = slice(first, last)
            out[rows] = paged_prefill_attention(q[rows], k_cache, v_cache, block_tables[i], starts[i], scale,
                                                sliding_window, logits_soft_cap, k_scale, v_scale)
    return out
