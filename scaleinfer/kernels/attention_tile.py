"""The inner step of paged flash attention, shared by the decode and prefill kernels.

A tile's keys are gathered token by token through the block table (token t lives in block
table[t // BLOCK_SIZE] at slot t % BLOCK_SIZE), so any block size works and a tile may span blocks.

Two optional features are constexpr, so that with both off the kernels compile to the plain loop:
SOFTCAP > 0 caps each score at softcap * tanh(score / softcap) (Gemma 2), and WINDOW > 0 hides keys at
positions <= the query's position - WINDOW (sliding-window layers).
"""

import torch

from scaleinfer.kernels.dispatch import mma, tl, triton

LOG2E = 1.4426950408889634  # softmax runs in base 2: callers pass scale * LOG2E


def score_scale(scale: float, logits_soft_cap: float | None) -> float:
    """What attend_tile multiplies q.k by: scale * LOG2E, or scale / softcap when capping (the cap's own
    multiplier, softcap * LOG2E, follows the tanh)."""
    return scale / logits_soft_cap if logits_soft_cap else scale * LOG2E


def feature_constants(sliding_window: int | None, logits_soft_cap: float | None) -> dict[str, object]:
    """The WINDOW and SOFTCAP constexprs (0 = off), checked."""
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window is {sliding_window!r}, expected a positive int or None")
    if logits_soft_cap is not None and not logits_soft_cap > 0:
        raise ValueError(f"logits_soft_cap is {logits_soft_cap!r}, expected a positive float or None")
    return dict(WINDOW=sliding_window or 0, SOFTCAP=float(logits_soft_cap or 0.0))


def cache_scales(k_cache: torch.Tensor, q: torch.Tensor, k_scale: float, v_scale: float) -> tuple[float, float]:
    """The scales the kernels apply: an FP8 cache's, 1.0 for a cache in q's dtype."""
    return (k_scale, v_scale) if k_cache.dtype != q.dtype else (1.0, 1.0)


@triton.jit
def fp8_query(q, qk_scale):
    """The query tile over an FP8 cache when q is bfloat16: float16 and already times qk_scale, so that attend_tile
    multiplies float16 tiles with qk_scale 1. e4m3 converts to float16 in one instruction a pair of values
    (cvt.rn.f16x2.e4m3x2); to bfloat16 it takes two more (through float16), and the conversions bounded the
    decode: 64 sequences at 4k context read an e4m3 cache at 1.36 TB/s against a bfloat16 cache's 4.27 (H200).
    float16 holds the scaled query (|q| * scale stays far inside its range) with more mantissa than bfloat16."""
    return (q.to(tl.float32) * qk_scale).to(tl.float16)


@triton.jit
def fp8_v_tile(v, kv_mask):
    """An FP8 cache's V tile v (already converted to q's dtype, [BLOCK_N, BLOCK_D]), pinned to the load's layout.

    P @ V takes V as the B operand. Triton (3.9: RemoveLayoutConversions' dot-operand hoist) moves a B operand's
    layout change up to its load, over elementwise ops such as the conversion, so the e4m3 bytes were staged in
    shared memory and read back in the operand's layout a byte at a time (64 ld.shared.b8 a thread a tile; sm90
    has no 8-bit ldmatrix.trans): the decode read an e4m3 cache at 1.6 TB/s against bf16's 4.27 (H200, 64 x 4k).
    That hoist gives up when a leaf of the chain is neither a load nor a constant; this select's mask is one
    (built from aranges). The select itself changes nothing (the load's own mask and fill), and the tile now
    goes through shared memory as 16-bit values that ldmatrix.trans reads (bench/ptx_decode_attention.py)."""
    return tl.where(kv_mask, v, 0.0)


@triton.jit
def tanh(x):
    """float32 tanh from exp2 (the interpreter has no libdevice): the odd series near 0, where
    (1 - e^-2|x|) / (1 + e^-2|x|) would cancel, that quotient elsewhere. Below 0.05 the series to x^5 is
    off by less than 1e-9 relative. (Kernels read no Python globals: log2(e) is spelled out.)"""
    ax = tl.abs(x)
    e = tl.exp2(-2.0 * 1.4426950408889634 * ax)
    far = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    near = ax * (1.0 - x2 * (1.0 / 3.0 - x2 * (2.0 / 15.0)))
    t = tl.where(ax < 0.05, near, far)
    return tl.where(x < 0, -t, t)


@triton.jit
def attend_tile(
    q, m_i, l_i, acc, tile, kv_end, query_pos, k_ptr, v_ptr, table_ptr,
    cache_stride_block, cache_stride_slot, qk_scale, dims, dim_mask,
    MASKED: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    CONVERT_V_EARLY: tl.constexpr,
):
    """One online-softmax step over keys tile..tile + BLOCK_N of one KV head.

    q: [BLOCK_M, BLOCK_D] query rows; m_i, l_i: [BLOCK_M] running max (log2 domain) and sum; acc:
    [BLOCK_M, BLOCK_D]; query_pos: [BLOCK_M], each row sees keys at positions <= its own and < kv_end
    (and > its own - WINDOW when WINDOW > 0). qk_scale: score_scale(scale, softcap), times an FP8 cache's
    k_scale. k_ptr, v_ptr point at
    the KV head in the caches; table_ptr at the sequence's block table. With MASKED off the tile must lie
    wholly below kv_end and be visible to every row. CONVERT_V_EARLY: an FP8 V tile is converted where it is
    loaded (fp8_v_tile), for products that read their B operand from registers (mma.sync: fewer than 64 rows,
    or before sm90); wgmma reads it from shared memory, where the select would only cost registers.
    """
    keys = tile + tl.arange(0, BLOCK_N)
    key_mask = keys < kv_end
    blocks = tl.load(table_ptr + keys // BLOCK_SIZE, mask=key_mask, other=0)
    kv_off = blocks.to(tl.int64) * cache_stride_block + (keys % BLOCK_SIZE) * cache_stride_slot  # [BLOCK_N]
    kv_mask = key_mask[:, None] & dim_mask
    # An FP8 cache is read as q's dtype; its scales are the callers' (k's in qk_scale, v's on the output).
    k = tl.load(k_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0).to(q.dtype)  # [BLOCK_N, BLOCK_D]
    scores = mma(q, tl.trans(k), UPCAST, PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
    if SOFTCAP > 0:
        scores = tanh(scores) * (SOFTCAP * 1.4426950408889634)  # softcap * LOG2E
    if MASKED:
        visible = key_mask[None, :] & (keys[None, :] <= query_pos[:, None])
        if WINDOW > 0:
            visible = visible & (keys[None, :] > query_pos[:, None] - WINDOW)
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_ref = m_new
    if WINDOW > 0:
        # A row may have seen no key yet (its window starts past this tile): keep exp2 off -inf - -inf.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    # Without a window key 0 is visible to every row, so each row's max is finite once a tile has been seen.
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(scores - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0).to(q.dtype)
    if CONVERT_V_EARLY and v_ptr.dtype.element_ty.is_fp8():  # compile time
        v = fp8_v_tile(v, kv_mask)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST, PRECISION)
    return m_new, l_i, acc
