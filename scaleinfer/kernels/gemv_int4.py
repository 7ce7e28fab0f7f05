"""y = x @ W.T for group-wise INT4 weights: a weight-streaming GEMV for decode, its torch reference, the format.

The format (layers/quant_int4.py stores it): levels q in 0..15, two per byte along K (even column in the low
nibble, odd column in the high one): packed [N, K // 2] uint8; per group of `group_size` input features of a
row a scale and a zero, scale [N, G] and zero [N, G] float32 (G = K // group_size), and

    w[n, c] = (q[n, c] - 8) * scale[n, c // group_size] + zero[n, c // group_size]

torch's CPU int4 kernel (aten._weight_int4pack_mm_for_cpu) has the same arithmetic, so one format serves
quantize-on-load (asymmetric: zero = min + 8 * scale), GGUF Q4_1 (w = d * q + m: scale d, zero m + 8d) and
GGUF Q4_0 (w = d * (q - 8): zero 0). Each program of the kernel owns BLOCK_N output features of one row of x and
walks K a few whole groups per step (BLOCK_K input features, at least one group), reading BLOCK_K // 2 bytes
per feature; it multiplies the raw levels and applies each group's scale and zero once per group sum, not
per weight: half the bytes of the int8 GEMV, no dequantized copy of the weight.
"""

from __future__ import annotations

import torch

from scaleinfer.kernels.checks import (
    FLOAT_DTYPES,
    check_bias,
    check_contiguous,
    check_dtype,
    check_shape,
    floor_power_of_two,
    is_power_of_two,
)
from scaleinfer.kernels.dispatch import tl, triton, use_triton
from scaleinfer.kernels.gemv import GemvConfig, float32_linear_ref

INT4_GEMV = GemvConfig(block_n=16, block_k=512, num_warps=4, num_stages=2)
MAX_GEMV_ROWS = 4  # rows of x the GEMV takes; past it each extra row rereads the weight, so dequantize + GEMM
ZERO_POINT = 8  # levels are stored unsigned; q - 8 is the signed level


def pack_int4(levels: torch.Tensor) -> torch.Tensor:
    """levels: [N, K] integers in 0..15, K even -> [N, K // 2] uint8 (even column low nibble)."""
    levels = levels.to(torch.uint8)
    return levels[:, 0::2] | (levels[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K // 2] uint8 -> levels [N, K] uint8 in 0..15."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(1)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, K // 2] uint8, [N, G], [N, G] -> [N, K] weights in `dtype` (computed in float32)."""
    levels = unpack_int4(packed).float()  # [N, K]
    group_size = levels.shape[1] // scale.shape[1]
    s = scale.float().repeat_interleave(group_size, dim=1)
    z = zero.float().repeat_interleave(group_size, dim=1)
    return ((levels - ZERO_POINT) * s + z).to(dtype)


def int4_linear_ref(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: x times the float32 dequantized weight. x: [M, K] -> [M, N] in x's dtype."""
    return float32_linear_ref(x, dequantize_int4(packed, scale, zero), bias)


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
              bias: torch.Tensor | None = None, config: GemvConfig = INT4_GEMV) -> torch.Tensor:
    """x: [M, K] float -> [M, N] in x's dtype, through the Triton kernel where it runs."""
    if use_triton(x):
        return int4_gemv_triton(x, packed, scale, zero, bias, config)
    return int4_linear_ref(x, packed, scale, zero, bias)


def _check(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
           bias: torch.Tensor | None) -> None:
    check_shape("x", x, [None, None])
    k = x.shape[1]
    if k % 2:
        raise ValueError(f"x has {k} input features; int4 weights need an even number")
    check_shape("packed", packed, [None, k // 2])
    n = packed.shape[0]
    check_shape("scale", scale, [n, None])
    check_shape("zero", zero, [n, scale.shape[1]])
    if scale.shape[1] == 0 or k % scale.shape[1] or not is_power_of_two(k // scale.shape[1]) or k == scale.shape[1]:
        raise ValueError(f"scale has {scale.shape[1]} groups, which do not split K={k} into groups of a power "
                         "of two (>= 2) input features")
    check_dtype("x", x, FLOAT_DTYPES)
    check_dtype("packed", packed, (torch.uint8,))
    check_dtype("scale", scale, (torch.float32,))
    check_dtype("zero", zero, (torch.float32,))
    for name, t in (("x", x), ("packed", packed), ("scale", scale), ("zero", zero)):
        check_contiguous(name, t)
    check_bias(bias, n, x.dtype)


def int4_gemv_triton(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     bias: torch.Tensor | None, config: GemvConfig = INT4_GEMV) -> torch.Tensor:
    _check(x, packed, scale, zero, bias)
    (m, k), n, num_groups = x.shape, packed.shape[0], scale.shape[1]
    group_size = k // num_groups
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, config.block_n), m)
    _int4_gemv_kernel[grid](
        x, packed, scale, zero, bias if bias is not None else out, out, n, k, num_groups,
        HALF_GROUP=group_size // 2, GROUPS_PER_STEP=floor_power_of_two(max(1, config.block_k // group_size)),
        HAS_BIAS=bias is not None, BLOCK_N=config.block_n, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


@triton.jit
def _int4_gemv_kernel(x_ptr, q_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, n, k, num_groups,
                      HALF_GROUP: tl.constexpr, GROUPS_PER_STEP: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    # Per group g of a row: sum_c w_c x_c = s_g * sum_c q_c x_c + (z_g - 8 s_g) * sum_c x_c, so a step
    # multiplies raw levels and applies each group's scale and zero once, to [BLOCK_N, GROUPS_PER_STEP] sums.
    row = tl.program_id(1).to(tl.int64)
    features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    feature_mask = features < n
    q_rows = q_ptr + features.to(tl.int64)[:, None, None] * (k // 2)  # [BLOCK_N, 1, 1]
    group_rows = features.to(tl.int64)[:, None] * num_groups  # [BLOCK_N, 1]
    x_row = x_ptr + row * k
    step_groups = tl.arange(0, GROUPS_PER_STEP)  # [G]
    half = tl.arange(0, HALF_GROUP)  # [H] byte columns of a group: input features 2p and 2p + 1
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for first in range(0, num_groups, GROUPS_PER_STEP):
        groups = first + step_groups  # [G]
        group_mask = groups < num_groups
        pairs = groups[:, None] * HALF_GROUP + half[None, :]  # [G, H]
        x_even = tl.load(x_row + 2 * pairs, mask=group_mask[:, None], other=0.0).to(tl.float32)  # [G, H]
        x_odd = tl.load(x_row + 2 * pairs + 1, mask=group_mask[:, None], other=0.0).to(tl.float32)
        mask = feature_mask[:, None] & group_mask[None, :]  # [BLOCK_N, G]
        byte = tl.load(q_rows + pairs[None, :, :], mask=mask[:, :, None], other=0)  # [BLOCK_N, G, H] uint8
        levels_x = tl.sum((byte & 0xF).to(tl.float32) * x_even[None, :, :]
                          + (byte >> 4).to(tl.float32) * x_odd[None, :, :], axis=2)  # [BLOCK_N, G]
        x_sums = tl.sum(x_even + x_odd, axis=1)  # [G]
        s = tl.load(scale_ptr + group_rows + groups[None, :], mask=mask, other=0.0)  # [BLOCK_N, G]
        z = tl.load(zero_ptr + group_rows + groups[None, :], mask=mask, other=0.0)
        acc += tl.sum(s * levels_x + (z - 8.0 * s) * x_sums[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + features, mask=feature_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + features, acc.to(out_ptr.dtype.element_ty), mask=feature_mask)
