"""The inner step of paged flash attention, shared by the decode and prefill kernels.

A tile's keys are gathered token by token through the block table (token t lives in block
table[t // BLOCK_SIZE] at slot t % BLOCK_SIZE), so any block size works and a tile may span blocks.
"""

from scaleinfer.kernels.dispatch import mma, tl, triton

LOG2E = 1.4426950408889634  # softmax runs in base 2: callers pass scale * LOG2E


@triton.jit
def attend_tile(
    q, m_i, l_i, acc, tile, kv_end, query_pos, k_ptr, v_ptr, table_ptr,
    cache_stride_block, cache_stride_slot, scale_log2, dims, dim_mask,
    MASKED: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One online-softmax step over keys tile..tile + BLOCK_N of one KV head.

    q: [BLOCK_M, BLOCK_D] query rows; m_i, l_i: [BLOCK_M] running max (log2 domain) and sum; acc:
    [BLOCK_M, BLOCK_D]; query_pos: [BLOCK_M], each row sees keys at positions <= its own and < kv_end.
    k_ptr, v_ptr point at the KV head in the caches; table_ptr at the sequence's block table. With MASKED
    off the tile must lie wholly below kv_end and below every row's position.
    """
    keys = tile + tl.arange(0, BLOCK_N)
    key_mask = keys < kv_end
    blocks = tl.load(table_ptr + keys // BLOCK_SIZE, mask=key_mask, other=0)
    kv_off = blocks.to(tl.int64) * cache_stride_block + (keys % BLOCK_SIZE) * cache_stride_slot  # [BLOCK_N]
    kv_mask = key_mask[:, None] & dim_mask
    k = tl.load(k_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    scores = mma(q, tl.trans(k), UPCAST, PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
    if MASKED:
        # Key 0 is visible to every row, so each row's max is finite once a tile has been seen.
        visible = key_mask[None, :] & (keys[None, :] <= query_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST, PRECISION)
    return m_new, l_i, acc
