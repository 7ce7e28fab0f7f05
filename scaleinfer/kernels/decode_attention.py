"""Paged decode attention, split-K (flash-decoding), one query token per sequence, GQA-packed.

Stage 1: program (seq, kv_head, partition) walks its partition of the sequence's context, a tile of
BLOCK_N tokens at a time, each token's page found through the block table, and keeps an online softmax
for all the query heads that share the KV head: K and V are read once per group. Stage 2: program
(seq, head) merges the partitions' (max, sum, normalized output). With one partition stage 1 writes
the output itself.

CUDA-graph safe: the grid and the partial buffers depend on max_context_len (a host int fixed at
capture, by default the block table's width in tokens), never on context_lens' values; a program reads
only tokens below its sequence's context_len, and partitions past it do no work.

A sliding window starts each partition's walk at the window's first key (partitions wholly before it
do no work); soft-capping caps each score (attention_tile.py). Both are constexpr: off, the kernel is
the plain one. An FP8 cache's k_scale multiplies the scores' scale and its v_scale each partition's output.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from scaleinfer.kernels.attention_tile import attend_tile, cache_scales, feature_constants, fp8_query, score_scale
from scaleinfer.kernels.checks import (
    INDEX_DTYPES,
    check_device,
    check_dtype,
    check_last_dim_contiguous,
    check_out,
    check_power_of_two,
    check_query_and_caches,
    check_shape,
    checking,
)
from scaleinfer.kernels.dispatch import dot_args, tl, triton, use_triton
from scaleinfer.kernels.paged_attention import paged_decode_attention

MIN_PARTITION = 128
# A bound this short gets one partition whatever the batch, so no reduce kernel runs. At batch 1 the walk
# of four 64-token tiles instead of two should cost less than the reduce (57 us per token over 32 layers on
# an H100, replayed in a graph); a longer bound walked by so few programs would lose to split-K. The graphs'
# shortest context bucket (cuda_graph.FIRST_BUCKET) is this long.
MAX_ONE_PARTITION = 256
REDUCE_BLOCK_P = 32  # partitions the reduce takes at a time, fixed: one compiled variant for every context


@dataclass(frozen=True, slots=True)
class DecodeTile:
    """How stage 1 walks a partition: block_n context tokens a tile (at most the partition), its warps and
    software-pipelining stages (bench/decode_attention_tiles.py times the candidates)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


# The best (or within 2% of it) for bf16 and e4m3 caches alike at 64 x 4096 on an H200
# (bench/results/decode-attention-tiles-llama3-8b-h200-20261203-060108.json): one tiling for both.
DEFAULT_TILE = DecodeTile()


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, max_context_len: int | None = None, out: torch.Tensor | None = None,
    sliding_window: int | None = None, logits_soft_cap: float | None = None,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    """q: [num_seqs, num_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    in q's dtype, or FP8 holding k / k_scale and v / v_scale (a cache in q's dtype ignores the scales);
    block_tables: [num_seqs, max_blocks] int32/int64; context_lens: [num_seqs] int32/int64, each at most
    max_context_len (default max_blocks * block_size). Returns out ([num_seqs, num_heads, head_dim], q's
    dtype; written in place when given). A sequence of context_len 0 gets zeros on the Triton path.
    sliding_window: the query (at context_len - 1) sees only the last sliding_window keys; logits_soft_cap:
    scores become cap * tanh(score / cap). None turns either off.
    """
    if use_triton(q):
        return decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len, out,
                                       sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                                       k_scale=k_scale, v_scale=v_scale)
    result = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window,
                                    logits_soft_cap, k_scale, v_scale)
    return result if out is None else out.copy_(result)


def decode_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, max_context_len: int | None = None, out: torch.Tensor | None = None,
    partition_size: int | None = None, sliding_window: int | None = None, logits_soft_cap: float | None = None,
    k_scale: float = 1.0, v_scale: float = 1.0, tile: DecodeTile | None = None,
) -> torch.Tensor:
    """partition_size: context tokens per stage-1 program (a power of two >= 16); chosen to fill the GPU
    when None. Tokens past cdiv(max_context_len, partition_size) partitions are never read: the bound is
    the caller's promise, not checked (that would sync). tile: stage 1's tiling (DEFAULT_TILE when None)."""
    if checking():
        _check(q, k_cache, v_cache, block_tables, context_lens, out)
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if max_context_len is None:
        max_context_len = block_tables.shape[1] * k_cache.shape[1]
    if partition_size is None:
        partition_size = _partition_size(num_seqs * num_kv_heads, max_context_len, q.device)
    _check_partition_size(partition_size)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    num_partitions = triton.cdiv(max(max_context_len, 1), partition_size)
    part_out, part_max, part_sum = _partials(q, num_partitions, out)
    tile = tile or DEFAULT_TILE
    _check_tile(tile)
    consts = _constants(q, k_cache, partition_size, tile) | feature_constants(sliding_window, logits_soft_cap)
    k_scale, v_scale = cache_scales(k_cache, q, k_scale, v_scale)
    _partition_kernel[(num_seqs, num_kv_heads, num_partitions)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_max, part_sum,
        score_scale(scale, logits_soft_cap) * k_scale, v_scale, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), num_partitions, partition_size,
        ONE_PARTITION=num_partitions == 1, **consts, **dot_args(q), num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )
    if num_partitions > 1:
        _reduce_kernel[(num_seqs, num_heads)](
            part_out, part_max, part_sum, context_lens, out, out.stride(0), out.stride(1), num_partitions,
            partition_size, HEAD_DIM=head_dim, BLOCK_D=consts["BLOCK_D"], BLOCK_P=REDUCE_BLOCK_P, num_warps=4,
        )
    return out


def _partials(
    q: torch.Tensor, num_partitions: int, out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-partition output [num_seqs, num_heads, num_partitions, head_dim], max and sum (float32);
    with one partition stage 1 writes out directly and these are unread stand-ins."""
    if num_partitions == 1:
        return out, out, out
    num_seqs, num_heads, head_dim = q.shape
    part_out = torch.empty(num_seqs, num_heads, num_partitions, head_dim, dtype=torch.float32, device=q.device)
    part_max = torch.empty(num_seqs, num_heads, num_partitions, dtype=torch.float32, device=q.device)
    return part_out, part_max, torch.empty_like(part_max)


def _constants(q: torch.Tensor, k_cache: torch.Tensor, partition_size: int, tile: DecodeTile) -> dict[str, int]:
    group, head_dim = q.shape[1] // k_cache.shape[2], q.shape[2]
    return dict(
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=k_cache.shape[1],
        BLOCK_N=min(tile.block_n, partition_size),
    )


def _check_partition_size(partition_size: int) -> None:
    check_power_of_two("partition_size", partition_size)
    if partition_size < 16:
        raise ValueError(f"partition_size is {partition_size}, expected at least 16")


def _check_tile(tile: DecodeTile) -> None:
    check_power_of_two("tile.block_n", tile.block_n)
    if tile.block_n < 16:
        raise ValueError(f"tile.block_n is {tile.block_n}, expected at least 16")


def _partition_size(num_groups: int, max_context_len: int, device: torch.device) -> int:
    """One partition up to MAX_ONE_PARTITION tokens; past it, the smallest power of two >= MIN_PARTITION
    giving the grid about two programs per multiprocessor. Depends on host ints only (graph capture)."""
    if max_context_len <= MAX_ONE_PARTITION:
        return max(MIN_PARTITION, triton.next_power_of_2(max(max_context_len, 1)))
    wanted = triton.cdiv(2 * _num_sms(device), num_groups)  # partitions per (seq, kv_head)
    size = triton.next_power_of_2(triton.cdiv(max(max_context_len, 1), wanted))
    return max(MIN_PARTITION, size)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check(q, k_cache, v_cache, block_tables, context_lens, out) -> None:
    check_query_and_caches(q, k_cache, v_cache)
    num_seqs = q.shape[0]
    check_shape("block_tables", block_tables, [num_seqs, None])
    check_dtype("block_tables", block_tables, INDEX_DTYPES)
    check_last_dim_contiguous("block_tables", block_tables)
    check_shape("context_lens", context_lens, [num_seqs])
    check_dtype("context_lens", context_lens, INDEX_DTYPES)
    check_device(q.device, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, context_lens=context_lens)
    check_out(out, q)


# Values that change from step to step are not specialized on (Triton would compile a variant per
# divisibility class of each, mid-run); only shapes fixed by the model are. partition_size is an argument,
# not a constant: it follows the context bucket, and as a constant each bucket compiled its own variant
# (one more mid-run whenever a step first reached a longer context). Always a multiple of 16: one class.
@triton.jit(do_not_specialize=["bt_stride", "num_partitions"])
def _partition_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,
    qk_scale, v_scale, q_stride_s, q_stride_h, cache_stride_block, cache_stride_slot, cache_stride_head,
    bt_stride, out_stride_s, out_stride_h, num_partitions, partition_size,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    ONE_PARTITION: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq).to(tl.int32)
    start = part * partition_size
    end = tl.minimum(start + partition_size, context_len)  # end <= start: nothing to do
    first = start
    if WINDOW > 0:  # keys below context_len - WINDOW are out of the query's window
        first = tl.maximum(start, context_len - WINDOW)

    heads = kv_head * GROUP + tl.arange(0, BLOCK_G)  # the query heads of this KV head, padded to BLOCK_G
    head_mask = tl.arange(0, BLOCK_G) < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims[None, :] < HEAD_DIM
    q_mask = head_mask[:, None] & dim_mask
    q = tl.load(q_ptr + seq * q_stride_s + heads[:, None] * q_stride_h + dims[None, :], mask=q_mask, other=0.0)
    if k_cache_ptr.dtype.element_ty == tl.float8e4nv and q_ptr.dtype.element_ty == tl.bfloat16:  # compile time
        q, qk_scale = fp8_query(q, qk_scale), 1.0
    query_pos = tl.full([BLOCK_G], 0, tl.int32) + context_len - 1

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    k_ptr, v_ptr = k_cache_ptr + kv_head * cache_stride_head, v_cache_ptr + kv_head * cache_stride_head
    table_ptr = block_tables_ptr + seq * bt_stride
    # One masked loop: a second, unmasked one for whole tiles would be pipelined with its own shared
    # memory, costing occupancy (11% slower at batch 64 on an H100); the mask is free in a memory-bound loop.
    for tile in range(first, end, BLOCK_N):  # every key in first..end is in the window: no window mask
        m_i, l_i, acc = attend_tile(
            q, m_i, l_i, acc, tile, end, query_pos, k_ptr, v_ptr, table_ptr, cache_stride_block,
            cache_stride_slot, qk_scale, dims, dim_mask, True, BLOCK_SIZE, BLOCK_N, UPCAST, PRECISION, 0, SOFTCAP,
            BLOCK_G < 64,  # BLOCK_G query rows: mma.sync below 64
        )

    acc = acc * (v_scale / tl.where(l_i == 0.0, 1.0, l_i))[:, None]  # an empty context gives zeros, not NaN
    if ONE_PARTITION:
        out = out_ptr + seq * out_stride_s + heads[:, None] * out_stride_h + dims[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        _store_partial(part_out_ptr, part_max_ptr, part_sum_ptr, acc, m_i, l_i, seq, heads, part, num_partitions,
                       start < context_len, dims, dim_mask, GROUP, BLOCK_G, HEAD_DIM)


@triton.jit
def _store_partial(part_out_ptr, part_max_ptr, part_sum_ptr, acc, m_i, l_i, seq, heads, part, num_partitions,
                   has_tokens, dims, dim_mask, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One partition's normalized output, max and sum into [num_seqs, num_heads, num_partitions(, head_dim)]."""
    row = (seq * GROUP * tl.num_programs(1) + heads) * num_partitions + part  # [BLOCK_G]
    live = tl.arange(0, BLOCK_G) < tl.where(has_tokens, GROUP, 0)  # nothing past the context
    tl.store(part_max_ptr + row, m_i, mask=live)
    tl.store(part_sum_ptr + row, l_i, mask=live)
    tl.store(part_out_ptr + row[:, None] * HEAD_DIM + dims[None, :], acc, mask=live[:, None] & dim_mask)


@triton.jit(do_not_specialize=["num_partitions"])
def _reduce_kernel(
    part_out_ptr, part_max_ptr, part_sum_ptr, context_lens_ptr, out_ptr, out_stride_s, out_stride_h,
    num_partitions, partition_size,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq).to(tl.int32)
    num_live = tl.cdiv(context_len, partition_size)  # partitions that saw tokens
    base = (seq * tl.num_programs(1) + head) * num_partitions
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM

    m = float("-inf")
    for p0 in range(0, num_live, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        m = tl.maximum(m, tl.max(tl.load(part_max_ptr + base + parts, mask=parts < num_live, other=float("-inf"))))
    total = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for p0 in range(0, num_live, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        mask = parts < num_live
        part_m = tl.load(part_max_ptr + base + parts, mask=mask, other=float("-inf"))
        weight = tl.load(part_sum_ptr + base + parts, mask=mask, other=0.0) * tl.exp2(part_m - m)  # [BLOCK_P]
        weight = tl.where(mask, weight, 0.0)
        outs = tl.load(part_out_ptr + (base + parts)[:, None] * HEAD_DIM + dims[None, :],
                       mask=mask[:, None] & dim_mask[None, :], other=0.0)
        total += tl.sum(weight, axis=0)
        acc += tl.sum(weight[:, None] * outs, axis=0)
    total = tl.where(total == 0.0, 1.0, total)
    out = out_ptr + seq * out_stride_s + head * out_stride_h + dims
    tl.store(out, (acc / total).to(out_ptr.dtype.element_ty), mask=dim_mask)
