"""Rotary position embedding fused with writing K and V into their cache pages.

One pass per token: the first rotary_dim dims of each q and k head are rotated in place (rotate-half
layout, as HF Llama and GPT-NeoX), the rest are left as they are, and k and v are stored at the token's
slot. rotary_dim is 2 * cos_cache.shape[1]: the whole head (Llama), a part of it (GPT-NeoX, Phi), or 0
(learned positions, GPT-2: only the cache write). Equal to rotating then write_kv_cache. A token whose
slot is negative is rotated but not written; the engine pads captured batches with a scratch slot
instead, so no step depends on that. An FP8 cache stores k / k_scale and v / v_scale, saturated at +-448
(paged_attention.py); q and k keep their rotated values in the run dtype.
"""

from __future__ import annotations

import torch

from scaleinfer.kernels.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_cache_dtype,
    check_contiguous,
    check_device,
    check_dtype,
    check_last_dim_contiguous,
    check_same_dtype,
    check_shape,
    checking,
)
from scaleinfer.kernels.dispatch import tl, triton, use_triton
from scaleinfer.kernels.gemv_fp8 import round_e4m3
from scaleinfer.kernels.paged_attention import FP8_CACHE_DTYPE, write_kv_cache


def rotary_kv(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cos_cache: torch.Tensor, sin_cache: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    """Rotate the first rotary_dim dims of q and k in place and write k, v into the caches.

    positions, slot_mapping: [num_tokens] int32/int64; q: [num_tokens, num_heads, head_dim];
    k, v: [num_tokens, num_kv_heads, head_dim] (views of a fused QKV output are fine: only the last
    dimension must be contiguous); cos_cache, sin_cache: [max_position, rotary_dim / 2] float32, with
    rotary_dim even and <= head_dim ([*, 0]: no rotation); k_cache, v_cache: [num_blocks, block_size,
    num_kv_heads, head_dim] in q's dtype or FP8 (then k_scale, v_scale: the layer's cache scales).
    """
    run = rotary_kv_triton if use_triton(q) else rotary_kv_ref
    run(positions, q, k, v, cos_cache, sin_cache, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def rotary_kv_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cos_cache: torch.Tensor, sin_cache: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    rotary_dim = 2 * cos_cache.shape[1]
    if rotary_dim:
        rotate_(positions, q[..., :rotary_dim], cos_cache, sin_cache)
        rotate_(positions, k[..., :rotary_dim], cos_cache, sin_cache)
    write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def rotate_(positions: torch.Tensor, x: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor) -> None:
    """Rotate x: [num_tokens, num_heads, rotary_dim] in place (a view of the first dims is fine: partial rotary)."""
    cos = cos_cache[positions].to(x.dtype).unsqueeze(1)  # [num_tokens, 1, rotary_dim / 2]
    sin = sin_cache[positions].to(x.dtype).unsqueeze(1)
    x.copy_(_rotate(x, cos, sin))


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """write_kv_cache, skipping tokens whose slot is negative, as the kernel does. The reference: on a GPU
    the check would be a host sync, and the kernel serves there."""
    slots = slot_mapping.long()
    if bool((slots < 0).any()):
        keep = slots >= 0
        k, v, slots = k[keep], v[keep], slots[keep]
    write_kv_cache(k, v, k_cache, v_cache, slots, k_scale, v_scale)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotary_kv_triton(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cos_cache: torch.Tensor, sin_cache: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    if checking():
        _check(positions, q, k, v, cos_cache, sin_cache, k_cache, v_cache, slot_mapping)
    fp8 = k_cache.dtype == FP8_CACHE_DTYPE
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, block_size, half_rot = k.shape[1], k_cache.shape[1], cos_cache.shape[1]
    _rotary_kv_kernel[(num_tokens,)](
        positions, slot_mapping, q, k, v, cos_cache, sin_cache, k_cache, v_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        1.0 / k_scale if fp8 else 1.0, 1.0 / v_scale if fp8 else 1.0, FP8=fp8, ROUND=not k_cache.is_cuda,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF_ROT=half_rot,
        BLOCK_SIZE=block_size, BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_KVH=triton.next_power_of_2(num_kv_heads), BLOCK_R=triton.next_power_of_2(max(half_rot, 1)),
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_TAIL=triton.next_power_of_2(max(head_dim - 2 * half_rot, 1)),
        num_warps=4,
    )


def _check(positions, q, k, v, cos_cache, sin_cache, k_cache, v_cache, slot_mapping) -> None:
    check_shape("q", q, [None, None, None])
    num_tokens, _, head_dim = q.shape
    check_dtype("q", q, FLOAT_DTYPES)
    check_shape("k", k, [num_tokens, None, head_dim])
    check_shape("v", v, list(k.shape))
    check_shape("positions", positions, [num_tokens])
    check_shape("slot_mapping", slot_mapping, [num_tokens])
    check_shape("cos_cache", cos_cache, [None, None])
    if 2 * cos_cache.shape[1] > head_dim:
        raise ValueError(f"cos_cache has shape {list(cos_cache.shape)}: rotary dim {2 * cos_cache.shape[1]} "
                         f"exceeds head_dim {head_dim}")
    check_shape("sin_cache", sin_cache, list(cos_cache.shape))
    check_shape("k_cache", k_cache, [None, None, k.shape[1], head_dim])
    check_shape("v_cache", v_cache, list(k_cache.shape))
    for name, t in dict(k=k, v=v).items():
        check_same_dtype(name, t, q)
    for name, t in dict(k_cache=k_cache, v_cache=v_cache).items():
        check_cache_dtype(name, t, q)
    for name, t in dict(positions=positions, slot_mapping=slot_mapping).items():
        check_dtype(name, t, INDEX_DTYPES)
    for name, t in dict(cos_cache=cos_cache, sin_cache=sin_cache).items():
        check_dtype(name, t, [torch.float32])
    for name, t in dict(q=q, k=k, v=v, cos_cache=cos_cache, sin_cache=sin_cache).items():
        check_last_dim_contiguous(name, t)
    if sin_cache.stride() != cos_cache.stride():
        raise ValueError(f"sin_cache has strides {sin_cache.stride()}, cos_cache {cos_cache.stride()}: must match")
    check_contiguous("k_cache", k_cache)
    check_contiguous("v_cache", v_cache)
    check_device(q.device, positions=positions, k=k, v=v, cos_cache=cos_cache, sin_cache=sin_cache,
                 k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)


@triton.jit
def _rotate_heads(x_ptr, token_stride, head_stride, token, cos, sin,
                  NUM: tl.constexpr, HALF_ROT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rotate the first 2 * HALF_ROT dims of one token's NUM heads in place; returns the rotated halves
    [BLOCK_H, BLOCK_R] in x's dtype."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_R)[None, :]
    mask = (heads < NUM) & (dims < HALF_ROT)
    ptr = x_ptr + token * token_stride + heads * head_stride + dims
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF_ROT, mask=mask, other=0.0).to(tl.float32)
    r1 = (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty)
    r2 = (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty)
    tl.store(ptr, r1, mask=mask)
    tl.store(ptr + HALF_ROT, r2, mask=mask)
    return r1, r2


@triton.jit
def _rotary_kv_kernel(
    pos_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr,
    q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h, cos_stride,
    cache_stride_block, cache_stride_slot, cache_stride_head, k_inv_scale, v_inv_scale,
    FP8: tl.constexpr, ROUND: tl.constexpr,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_ROT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_TAIL: tl.constexpr,
):
    # One program per token: all its query heads, then its KV heads into the cache.
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_KVH)[:, None]
    written = heads < tl.where(slot >= 0, NUM_KV_HEADS, 0)  # [BLOCK_KVH, 1]; a negative slot writes no head
    cache_off = (slot // BLOCK_SIZE) * cache_stride_block + (slot % BLOCK_SIZE) * cache_stride_slot
    cache_off += heads * cache_stride_head  # [BLOCK_KVH, 1]
    k_row = k_ptr + token * k_stride_t + heads * k_stride_h
    if HALF_ROT > 0:
        pos = tl.load(pos_ptr + token).to(tl.int64)
        dims = tl.arange(0, BLOCK_R)[None, :]
        # The caches hold float32 angles; round them to the run dtype as the reference does.
        cos = tl.load(cos_ptr + pos * cos_stride + dims, mask=dims < HALF_ROT, other=0.0)
        sin = tl.load(sin_ptr + pos * cos_stride + dims, mask=dims < HALF_ROT, other=0.0)
        cos = cos.to(q_ptr.dtype.element_ty).to(tl.float32)  # [1, BLOCK_R]
        sin = sin.to(q_ptr.dtype.element_ty).to(tl.float32)
        _rotate_heads(q_ptr, q_stride_t, q_stride_h, token, cos, sin, NUM_HEADS, HALF_ROT, BLOCK_H, BLOCK_R)
        k1, k2 = _rotate_heads(k_ptr, k_stride_t, k_stride_h, token, cos, sin, NUM_KV_HEADS, HALF_ROT,
                               BLOCK_KVH, BLOCK_R)
        mask = written & (dims < HALF_ROT)
        tl.store(k_cache_ptr + cache_off + dims, _to_cache(k1, k_inv_scale, FP8, ROUND), mask=mask)
        tl.store(k_cache_ptr + cache_off + HALF_ROT + dims, _to_cache(k2, k_inv_scale, FP8, ROUND), mask=mask)
    if 2 * HALF_ROT < HEAD_DIM:  # the dims past the rotary ones go to the cache as they are
        tail = 2 * HALF_ROT + tl.arange(0, BLOCK_TAIL)[None, :]
        mask = written & (tail < HEAD_DIM)
        tl.store(k_cache_ptr + cache_off + tail, _to_cache(tl.load(k_row + tail, mask=mask), k_inv_scale, FP8, ROUND),
                 mask=mask)
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = written & (dims < HEAD_DIM)
    v_row = v_ptr + token * v_stride_t + heads * v_stride_h
    tl.store(v_cache_ptr + cache_off + dims, _to_cache(tl.load(v_row + dims, mask=mask), v_inv_scale, FP8, ROUND),
             mask=mask)


@triton.jit
def _to_cache(x, inv_scale, FP8: tl.constexpr, ROUND: tl.constexpr):
    """x as the cache stores it: as it is, or for FP8 x / scale saturated to +-448 (the store casts). ROUND
    (off the GPU): rounded to e4m3's grid first, since Triton's interpreter casts a value that rounds up into
    the next binade to half of it (127.6 -> 64); the GPU's conversion rounds to nearest even itself."""
    if FP8:
        x = tl.clamp(x.to(tl.float32) * inv_scale, -448.0, 448.0)
        if ROUND:
            x = round_e4m3(x)
    return x
