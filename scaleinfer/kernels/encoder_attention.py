"""Encoder attention: one non-causal flash-attention launch over a packed, padding-free batch.

The batch's sequences lie back to back in q, k and v ([num_tokens, num_heads, head_dim]); sequence i is
rows cu_seqlens[i]:cu_seqlens[i + 1], and a query sees every key of its own sequence and none of another's.
There is no KV cache: K and V are read straight from the packed tensors, which may be strided views into
one fused QKV projection (only the last dimension must be contiguous).

A program takes BLOCK_M query tokens of one sequence and one head and walks the sequence's keys BLOCK_N
at a time; only the last key tile, which may run past the sequence's end, is masked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scaleinfer.kernels.attention_tile import LOG2E
from scaleinfer.kernels.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_device,
    check_dtype,
    check_last_dim_contiguous,
    check_out,
    check_power_of_two,
    check_same_dtype,
    check_shape,
)
from scaleinfer.kernels.dispatch import dot_args, mma, tl, triton, use_triton

# Tiles on the GPU for encoder head dims (32: MiniLM, 64: BERT-large), by analogy with prefill_attention's
# H100 tiles; not yet measured. The interpreter takes the smallest legal tiles.
GPU_TILES = dict(block_m=64, block_n=64, num_warps=4, num_stages=2)
CPU_TILES = dict(block_m=16, block_n=16, num_warps=4, num_stages=1)


def encoder_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seq_len: int, scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q, k, v: [num_tokens, num_heads, head_dim]; cu_seqlens: [num_seqs + 1] (int32/int64), sequence i's
    tokens being rows cu_seqlens[i]:cu_seqlens[i + 1]; max_seq_len: the longest sequence, a host int.
    Returns out ([num_tokens, num_heads, head_dim], q's dtype; written in place when given)."""
    if use_triton(q):
        return encoder_attention_triton(q, k, v, cu_seqlens, max_seq_len, scale, out)
    result = encoder_attention_reference(q, k, v, cu_seqlens, scale)
    return result if out is None else out.copy_(result)


def encoder_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """One SDPA call per sequence: the fastest of three on the CPU (2 cores, MiniLM heads, float32).
    Padding the batch to [num_seqs, max_len] for one masked SDPA call ties with it on 64 sentences of 6-70
    tokens (15-20 ms each) and loses on 16 of 128-256 (33 vs 24 ms), and all-MiniLM embed() of 64 texts
    took 2.5 s that way against 2.05 s; one SDPA call with a block-diagonal [num_tokens, num_tokens] mask
    is 30-50x slower at 2-3k tokens."""
    bounds = cu_seqlens.tolist()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    for start, end in zip(bounds[:-1], bounds[1:]):
        heads_first = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # [num_heads, seq_len, head_dim]
        out[start:end] = F.scaled_dot_product_attention(*heads_first, scale=scale).transpose(0, 1)
    return out


def encoder_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seq_len: int, scale: float,
    out: torch.Tensor | None = None, block_m: int | None = None, block_n: int | None = None,
) -> torch.Tensor:
    """block_m (query tokens per program) and block_n (keys per tile): powers of two >= 16, tuned for the
    device when None."""
    _check(q, k, v, cu_seqlens, max_seq_len, out)
    _, num_heads, head_dim = q.shape
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    tiles = _tiles(q, block_m, block_n)
    grid = (triton.cdiv(max_seq_len, tiles["BLOCK_M"]), cu_seqlens.shape[0] - 1, num_heads)
    _encoder_kernel[grid](
        q, k, v, cu_seqlens, out, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), **tiles, **dot_args(q),
    )
    return out


def _tiles(q: torch.Tensor, block_m: int | None, block_n: int | None) -> dict[str, int]:
    tiles = GPU_TILES if q.is_cuda else CPU_TILES
    block_m, block_n = block_m or tiles["block_m"], block_n or tiles["block_n"]
    for name, value in dict(block_m=block_m, block_n=block_n).items():
        check_power_of_two(name, value)
        if value < 16:
            raise ValueError(f"{name} is {value}, expected at least 16")
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=tiles["num_warps"], num_stages=tiles["num_stages"])


def _check(q, k, v, cu_seqlens, max_seq_len, out) -> None:
    check_shape("q", q, [None, None, None])
    check_dtype("q", q, FLOAT_DTYPES)
    for name, t in dict(q=q, k=k, v=v).items():
        check_shape(name, t, list(q.shape))
        check_same_dtype(name, t, q)
        check_last_dim_contiguous(name, t)
    check_shape("cu_seqlens", cu_seqlens, [None])
    check_dtype("cu_seqlens", cu_seqlens, INDEX_DTYPES)
    check_last_dim_contiguous("cu_seqlens", cu_seqlens)
    if cu_seqlens.shape[0] < 1:
        raise ValueError("cu_seqlens is empty, expected num_seqs + 1 offsets starting at 0")
    if max_seq_len < 0:
        raise ValueError(f"max_seq_len is {max_seq_len}, expected the longest sequence's length (>= 0)")
    check_device(q.device, k=k, v=v, cu_seqlens=cu_seqlens)
    check_out(out, q)


@triton.jit
def _encoder_kernel(
    q_ptr, k_ptr, v_ptr, cu_seqlens_ptr, out_ptr, qk_scale,
    q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h, out_stride_t, out_stride_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    q_block = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2).to(tl.int64)
    first = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    seq_len = (tl.load(cu_seqlens_ptr + seq + 1) - first).to(tl.int32)

    tokens = q_block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M], within the sequence
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims[None, :] < HEAD_DIM
    row_mask = (tokens < seq_len)[:, None] & dim_mask
    q_off = (first + tokens)[:, None] * q_stride_t + head * q_stride_h + dims[None, :]
    q = tl.load(q_ptr + q_off, mask=row_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    # A block past the sequence's end sees no keys (and stores nothing); the others see all seq_len keys,
    # whole tiles unmasked, the ragged last one masked.
    kv_end = tl.where(q_block * BLOCK_M < seq_len, seq_len, 0)
    full_end = kv_end // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_seq = k_ptr + first * k_stride_t + head * k_stride_h
    v_seq = v_ptr + first * v_stride_t + head * v_stride_h
    for tile in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _attend_keys(q, m_i, l_i, acc, tile, kv_end, k_seq, v_seq, k_stride_t, v_stride_t, qk_scale,
                                     dims, dim_mask, False, BLOCK_N, UPCAST, PRECISION)
    for tile in range(full_end, kv_end, BLOCK_N):
        m_i, l_i, acc = _attend_keys(q, m_i, l_i, acc, tile, kv_end, k_seq, v_seq, k_stride_t, v_stride_t, qk_scale,
                                     dims, dim_mask, True, BLOCK_N, UPCAST, PRECISION)

    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_off = (first + tokens)[:, None] * out_stride_t + head * out_stride_h + dims[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _attend_keys(
    q, m_i, l_i, acc, tile, kv_end, k_seq, v_seq, k_stride_t, v_stride_t, qk_scale, dims, dim_mask,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One online-softmax step (base 2) over the sequence's keys tile..tile + BLOCK_N for every query row.
    k_seq, v_seq point at the sequence's first token in the head. With MASKED off the tile must lie wholly
    below kv_end. Key 0 is visible to every row, so each row's max is finite after the first tile."""
    keys = tile + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    key_mask = keys < kv_end
    kv_mask = dim_mask
    if MASKED:
        kv_mask = key_mask[:, None] & dim_mask
    k = tl.load(k_seq + keys[:, None].to(tl.int64) * k_stride_t + dims[None, :], mask=kv_mask, other=0.0)
    scores = mma(q, tl.trans(k), UPCAST, PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
    if MASKED:
        scores = tl.where(key_mask[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_seq + keys[:, None].to(tl.int64) * v_stride_t + dims[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST, PRECISION)
    return m_new, l_i, acc
