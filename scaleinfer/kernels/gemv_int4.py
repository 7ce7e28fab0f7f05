"""y = x @ W.T for group-wise INT4 weights: a weight-streaming GEMV for decode, its torch reference, the format.

The format (layers/quant_int4.py stores it): levels q in 0..15, two per byte along K (even column in the low
nibble, odd column in the high one): packed [N, K // 2] uint8; per group of `group_size` input features of a
row a scale and a zero, scale [N, G] and zero [N, G] float32 (G = K // group_size), and

    w[n, c] = (q[n, c] - 8) * scale[n, c // group_size] + zero[n, c // group_size]

torch's CPU int4 kernel (aten._weight_int4pack_mm_for_cpu) has the same arithmetic, so one format serves
quantize-on-load (asymmetric: zero = min + 8 * scale), GGUF Q4_1 (w = d * q + m: scale d, zero m + 8d) and
GGUF Q4_0 (w = d * (q - 8): zero 0). Each program of the kernel owns BLOCK_N output features of one row of x,
walks K in BLOCK_K steps reading BLOCK_K // 2 bytes per feature, dequantizes in registers and keeps float32
partial sums: half the bytes of the int8 GEMV, no dequantized copy of the weight.
"""

from __future__ import annotations

import torch

from scaleinfer.kernels.checks import FLOAT_DTYPES, check_bias, check_contiguous, check_dtype, check_shape
from scaleinfer.kernels.dispatch import tl, triton, use_triton
from scaleinfer.kernels.gemv import GemvConfig

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
    y = x.float() @ dequantize_int4(packed, scale, zero).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


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
    if scale.shape[1] == 0 or k % scale.shape[1] or (k // scale.shape[1]) % 2:
        raise ValueError(f"scale has {scale.shape[1]} groups, which do not split K={k} into even-sized groups")
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
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, config.block_n), m)
    _int4_gemv_kernel[grid](
        x, packed, scale, zero, bias if bias is not None else out, out, n, k, num_groups,
        GROUP_SIZE=k // num_groups, HAS_BIAS=bias is not None, BLOCK_N=config.block_n,
        HALF_K=config.block_k // 2, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


@triton.jit
def _int4_gemv_kernel(x_ptr, q_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, n, k, num_groups,
                      GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                      HALF_K: tl.constexpr):
    row = tl.program_id(1).to(tl.int64)
    features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    feature_mask = features < n
    q_rows = q_ptr + features.to(tl.int64)[:, None] * (k // 2)  # [BLOCK_N, 1]
    group_rows = features.to(tl.int64)[:, None] * num_groups  # [BLOCK_N, 1]
    x_row = x_ptr + row * k
    acc = tl.zeros((BLOCK_N, HALF_K), dtype=tl.float32)
    for start in range(0, k // 2, HALF_K):
        pairs = start + tl.arange(0, HALF_K)  # [HALF_K] byte columns: input features 2p and 2p + 1
        pair_mask = pairs < k // 2
        mask = feature_mask[:, None] & pair_mask[None, :]
        byte = tl.load(q_rows + pairs[None, :], mask=mask, other=0)  # [BLOCK_N, HALF_K] uint8
        groups = group_rows + (2 * pairs // GROUP_SIZE)[None, :]  # a pair never straddles a group (even size)
        s = tl.load(scale_ptr + groups, mask=mask, other=0.0)
        z = tl.load(zero_ptr + groups, mask=mask, other=0.0)
        x_even = tl.load(x_row + 2 * pairs, mask=pair_mask, other=0.0).to(tl.float32)
        x_odd = tl.load(x_row + 2 * pairs + 1, mask=pair_mask, other=0.0).to(tl.float32)
        w_even = ((byte & 0xF).to(tl.float32) - 8.0) * s + z
        w_odd = ((byte >> 4).to(tl.float32) - 8.0) * s + z
        acc += w_even * x_even[None, :] + w_odd * x_odd[None, :]
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(bias_ptr + features, mask=feature_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + features, y.to(out_ptr.dtype.element_ty), mask=feature_mask)
