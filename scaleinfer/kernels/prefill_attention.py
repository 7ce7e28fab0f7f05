"""Prefill attention over the paged cache: a flash-attention kernel for chunks of several sequences.

Sequence i's chunk is q rows query_start_loc[i]:query_start_loc[i + 1], at positions start_pos[i]..; its
keys are the sequence's first start_pos[i] + chunk length tokens, read from the cache through its block
table (so the chunk's own K/V must be written first). That covers a whole prompt (start_pos 0), a chunk
of a long one, and a prompt whose prefix was a cache hit. Causal: a query sees keys at positions <= its own.

A program takes BLOCK_Q query tokens of one sequence and all query heads of one KV head: its tile has
BLOCK_M = BLOCK_Q * GROUP_PAD rows, row r being token r // GROUP_PAD, head r % GROUP_PAD of the group, so
each K/V tile is read once per group.

Optional, constexpr (off, the kernel is the plain one): a sliding window (a query at position p sees keys
at positions > p - window only), whose tiles wholly outside every row's window are skipped, and
soft-capping of the scores (attention_tile.py). An FP8 cache's k_scale multiplies the scores' scale and its
v_scale the output.
"""

from __future__ import annotations

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
from scaleinfer.kernels.paged_attention import paged_prefill_attention_varlen

# Tiles on the GPU (H100, bf16, head_dim 128); the interpreter takes the smallest legal tiles.
GPU_TILES = dict(block_m=64, block_n=64, num_warps=4, num_stages=2)
# Heads wider than 128 (Gemma's 256): half the key tile, twice the warps, so that the [64, 256] float32
# accumulator and the double-buffered K/V tiles fit registers and shared memory. Not yet measured.
WIDE_HEAD_GPU_TILES = dict(block_m=64, block_n=32, num_warps=8, num_stages=2)


def prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, start_pos: torch.Tensor, scale: float,
    max_query_len: int | None = None, out: torch.Tensor | None = None,
    sliding_window: int | None = None, logits_soft_cap: float | None = None,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, num_kv_heads,
    head_dim] in q's dtype, or FP8 holding k / k_scale and v / v_scale; block_tables: [num_seqs, max_blocks];
    query_start_loc: [num_seqs + 1]; start_pos: [num_seqs]
    (all int32/int64). max_query_len: the longest chunk, a host int (read from query_start_loc, a device
    sync, when None). Returns out ([num_tokens, num_heads, head_dim], q's dtype; written in place when given).
    sliding_window: a query at position p sees keys at positions > p - sliding_window only; logits_soft_cap:
    scores become cap * tanh(score / cap). None turns either off.
    """
    if use_triton(q):
        return prefill_attention_triton(
            q, k_cache, v_cache, block_tables, query_start_loc, start_pos, scale, max_query_len, out,
            sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, k_scale=k_scale, v_scale=v_scale,
        )
    result = paged_prefill_attention_varlen(q, k_cache, v_cache, block_tables, query_start_loc, start_pos, scale,
                                            sliding_window, logits_soft_cap, k_scale, v_scale)
    return result if out is None else out.copy_(result)


def prefill_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, start_pos: torch.Tensor, scale: float,
    max_query_len: int | None = None, out: torch.Tensor | None = None,
    block_m: int | None = None, block_n: int | None = None,
    sliding_window: int | None = None, logits_soft_cap: float | None = None,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    """block_m (query rows per program, tokens x padded group) and block_n (keys per tile): tile sizes,
    powers of two >= 16, tuned for the GPU when None."""
    if checking():
        _check(q, k_cache, v_cache, block_tables, query_start_loc, start_pos, out)
    features = feature_constants(sliding_window, logits_soft_cap)
    k_scale, v_scale = cache_scales(k_cache, q, k_scale, v_scale)
    _, num_heads, head_dim = q.shape
    num_seqs, num_kv_heads = block_tables.shape[0], k_cache.shape[2]
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max()) if num_seqs else 0
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    tiles = _tiles(q, group_pad, block_m, block_n)
    block_q = tiles["BLOCK_M"] // group_pad
    _prefill_kernel[(triton.cdiv(max_query_len, block_q), num_seqs, num_kv_heads)](
        q, k_cache, v_cache, block_tables, query_start_loc, start_pos, out,
        score_scale(scale, logits_soft_cap) * k_scale, v_scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=k_cache.shape[1], BLOCK_Q=block_q, **tiles, **dot_args(q), **features,
        CONVERT_V_EARLY=_mma_from_registers(q, tiles["BLOCK_M"]),
    )
    return out


def _mma_from_registers(q: torch.Tensor, block_m: int) -> bool:
    """Whether the tiles' products take their B operand from registers (mma.sync: before sm90, or fewer than
    64 rows), where attend_tile converts an FP8 V tile as it is loaded; sm90's wgmma reads it from shared memory
    (at GPU_TILES the early conversion cost it 25 registers a thread, 160 -> 185, for nothing)."""
    return not q.is_cuda or block_m < 64 or torch.cuda.get_device_capability(q.device) < (9, 0)


def _tiles(q: torch.Tensor, group_pad: int, block_m: int | None, block_n: int | None) -> dict[str, int]:
    """Tile sizes and launch shape; BLOCK_M holds whole groups of heads (BLOCK_M // group_pad tokens)."""
    tiles = dict(block_m=16, block_n=16, num_warps=4, num_stages=1)
    if q.is_cuda:
        tiles = WIDE_HEAD_GPU_TILES if q.shape[2] > 128 else GPU_TILES
    block_m, block_n = block_m or tiles["block_m"], block_n or tiles["block_n"]
    for name, value in dict(block_m=block_m, block_n=block_n).items():
        check_power_of_two(name, value)
        if value < 16:
            raise ValueError(f"{name} is {value}, expected at least 16")
    return dict(BLOCK_M=max(block_m, group_pad), BLOCK_N=block_n, num_warps=tiles["num_warps"],
                num_stages=tiles["num_stages"])


def _check(q, k_cache, v_cache, block_tables, query_start_loc, start_pos, out) -> None:
    check_query_and_caches(q, k_cache, v_cache)
    check_shape("block_tables", block_tables, [None, None])
    num_seqs = block_tables.shape[0]
    check_shape("query_start_loc", query_start_loc, [num_seqs + 1])
    check_shape("start_pos", start_pos, [num_seqs])
    for name, t in dict(block_tables=block_tables, query_start_loc=query_start_loc, start_pos=start_pos).items():
        check_dtype(name, t, INDEX_DTYPES)
        check_last_dim_contiguous(name, t)
    check_device(q.device, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                 query_start_loc=query_start_loc, start_pos=start_pos)
    check_out(out, q)


# Values that change from step to step are not specialized on (Triton would compile a variant per
# divisibility class of each, mid-run); only shapes fixed by the model are.
@triton.jit(do_not_specialize=["bt_stride"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr, start_pos_ptr, out_ptr, qk_scale, v_scale,
    q_stride_t, q_stride_h, cache_stride_block, cache_stride_slot, cache_stride_head,
    bt_stride, out_stride_t, out_stride_h,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    CONVERT_V_EARLY: tl.constexpr,
):
    q_block = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    kv_head = tl.program_id(2)
    q_first = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    q_len = (tl.load(query_start_loc_ptr + seq + 1) - q_first).to(tl.int32)
    start = tl.load(start_pos_ptr + seq).to(tl.int32)

    tokens, heads, row_mask = _query_rows(q_block, kv_head, q_len, GROUP, GROUP_PAD, BLOCK_M, BLOCK_Q)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims[None, :] < HEAD_DIM
    q_off = (q_first + tokens)[:, None] * q_stride_t + heads[:, None] * q_stride_h + dims[None, :]
    q = tl.load(q_ptr + q_off, mask=row_mask[:, None] & dim_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    if k_cache_ptr.dtype.element_ty == tl.float8e4nv and q_ptr.dtype.element_ty == tl.bfloat16:  # compile time
        q, qk_scale = fp8_query(q, qk_scale), 1.0
    query_pos = start + tokens  # [BLOCK_M]
    # Keys below the block's first query position are visible to every row: those whole tiles skip the
    # mask. Past them, up to the last live query's position, the causal mask applies. A block past the
    # chunk's end sees nothing.
    live = q_block * BLOCK_Q < q_len
    kv_end = tl.where(live, start + tl.minimum(q_block * BLOCK_Q + BLOCK_Q, q_len), 0)
    full_end = tl.where(live, (start + q_block * BLOCK_Q) // BLOCK_N * BLOCK_N, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_ptr, v_ptr = k_cache_ptr + kv_head * cache_stride_head, v_cache_ptr + kv_head * cache_stride_head
    table_ptr = block_tables_ptr + seq * bt_stride
    full_start = 0
    if WINDOW > 0:
        # Keys from the first row's window start to the last row's are in some windows, not all: masked
        # tiles; below them none is visible. full_start lies a whole number of tiles past win_start.
        last_pos = start + tl.minimum(q_block * BLOCK_Q + BLOCK_Q, q_len) - 1
        win_start = tl.maximum(start + q_block * BLOCK_Q - WINDOW + 1, 0)
        full_start = win_start + tl.cdiv(tl.maximum(last_pos - WINDOW + 1 - win_start, 0), BLOCK_N) * BLOCK_N
        full_end = tl.where(live, full_start + tl.maximum(start + q_block * BLOCK_Q + 1 - full_start, 0)
                            // BLOCK_N * BLOCK_N, 0)
        for tile in range(win_start, tl.where(live, full_start, 0), BLOCK_N):
            m_i, l_i, acc = attend_tile(
                q, m_i, l_i, acc, tile, kv_end, query_pos, k_ptr, v_ptr, table_ptr,
                cache_stride_block, cache_stride_slot, qk_scale, dims, dim_mask,
                True, BLOCK_SIZE, BLOCK_N, UPCAST, PRECISION, WINDOW, SOFTCAP, CONVERT_V_EARLY,
            )
    for tile in range(full_start, full_end, BLOCK_N):
        m_i, l_i, acc = attend_tile(
            q, m_i, l_i, acc, tile, kv_end, query_pos, k_ptr, v_ptr, table_ptr,
            cache_stride_block, cache_stride_slot, qk_scale, dims, dim_mask,
            False, BLOCK_SIZE, BLOCK_N, UPCAST, PRECISION, WINDOW, SOFTCAP, CONVERT_V_EARLY,
        )
    for tile in range(full_end, kv_end, BLOCK_N):
        m_i, l_i, acc = attend_tile(
            q, m_i, l_i, acc, tile, kv_end, query_pos, k_ptr, v_ptr, table_ptr,
            cache_stride_block, cache_stride_slot, qk_scale, dims, dim_mask,
            True, BLOCK_SIZE, BLOCK_N, UPCAST, PRECISION, WINDOW, SOFTCAP, CONVERT_V_EARLY,
        )

    acc = acc * (v_scale / tl.where(l_i == 0.0, 1.0, l_i))[:, None]
    out_off = (q_first + tokens)[:, None] * out_stride_t + heads[:, None] * out_stride_h + dims[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask)


@triton.jit
def _query_rows(q_block, kv_head, q_len, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_Q: tl.constexpr):
    """Row r of the tile: chunk token q_block * BLOCK_Q + r // GROUP_PAD, query head r % GROUP_PAD of the
    KV head's group. Returns tokens, heads, live rows, each [BLOCK_M]."""
    rows = tl.arange(0, BLOCK_M)
    tokens = q_block * BLOCK_Q + rows // GROUP_PAD
    heads = kv_head * GROUP + rows % GROUP_PAD
    return tokens, heads, (tokens < q_len) & (rows % GROUP_PAD < GROUP)
