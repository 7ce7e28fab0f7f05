"""y = x @ W.T for group-wise INT8 weights (GGUF Q8_0): a weight-streaming GEMV for decode, its torch reference.

The format (layers/quant_int8_groups.py stores it): levels q [N, K] int8 and, per group of `group_size` input
features of a row, one scale, scale [N, G] float32 (G = K // group_size):

    w[n, c] = q[n, c] * scale[n, c // group_size]

GGUF Q8_0 is this with groups of 32 (a float16 d per block: scale = d, exactly). A per-row scale would factor
out of the whole dot product (kernels/gemv_int8.py); a group's factors out of its group's, so each program of
the kernel owns BLOCK_N output features of one row of x and walks K a few whole groups per step, multiplying
the raw levels and applying each group's scale once to its group sum: one byte a weight, no dequantized copy.
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

# Not yet swept on a GPU: the int4 GEMV's features per program, 1024 input features (32 groups of Q8_0) a step.
INT8_GROUPS_GEMV = GemvConfig(block_n=8, block_k=1024, num_warps=4, num_stages=2)
MAX_GEMV_ROWS = 4  # rows of x the GEMV takes; past it each extra row rereads the weight, so dequantize + GEMM


def dequantize_int8_groups(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, K] int8, [N, G] -> [N, K] weights in `dtype` (computed in float32)."""
    group_size = q.shape[1] // scale.shape[1]
    w = q.float().view(q.shape[0], -1, group_size) * scale.float()[..., None]  # [N, G, group]
    return w.view(q.shape).to(dtype)


def int8_groups_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: x times the float32 dequantized weight. x: [M, K] -> [M, N] in x's dtype."""
    return float32_linear_ref(x, dequantize_int8_groups(q, scale), bias)


def int8_groups_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                     config: GemvConfig = INT8_GROUPS_GEMV) -> torch.Tensor:
    """x: [M, K] float -> [M, N] in x's dtype, through the Triton kernel where it runs."""
    if use_triton(x):
        return int8_groups_gemv_triton(x, q, scale, bias, config)
    return int8_groups_linear_ref(x, q, scale, bias)


def _check(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_shape("x", x, [None, None])
    k = x.shape[1]
    check_shape("q", q, [None, k])
    n = q.shape[0]
    check_shape("scale", scale, [n, None])
    groups = scale.shape[1]
    if groups == 0 or k % groups or not is_power_of_two(k // groups):
        raise ValueError(f"scale has {groups} groups, which do not split K={k} into groups of a power of two "
                         "input features")
    check_dtype("x", x, FLOAT_DTYPES)
    check_dtype("q", q, (torch.int8,))
    check_dtype("scale", scale, (torch.float32,))
    for name, t in (("x", x), ("q", q), ("scale", scale)):
        check_contiguous(name, t)
    check_bias(bias, n, x.dtype)


def int8_groups_gemv_triton(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                            config: GemvConfig = INT8_GROUPS_GEMV) -> torch.Tensor:
    _check(x, q, scale, bias)
    (m, k), n, num_groups = x.shape, q.shape[0], scale.shape[1]
    group_size = k // num_groups
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, config.block_n), m)
    _int8_groups_gemv_kernel[grid](
        x, q, scale, bias if bias is not None else out, out, n, k, num_groups,
        GROUP=group_size, GROUPS_PER_STEP=floor_power_of_two(max(1, config.block_k // group_size)),
        HAS_BIAS=bias is not None, BLOCK_N=config.block_n, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


@triton.jit
def _int8_groups_gemv_kernel(x_ptr, q_ptr, scale_ptr, bias_ptr, out_ptr, n, k, num_groups, GROUP: tl.constexpr,
                             GROUPS_PER_STEP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    # Per group g of a row: sum_c w_c x_c = s_g * sum_c q_c x_c, so a step multiplies raw levels and scales the
    # [BLOCK_N, GROUPS_PER_STEP] group sums once.
    row = tl.program_id(1).to(tl.int64)
    features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    feature_mask = features < n
    q_rows = q_ptr + features.to(tl.int64)[:, None, None] * k  # [BLOCK_N, 1, 1]
    group_rows = features.to(tl.int64)[:, None] * num_groups  # [BLOCK_N, 1]
    x_row = x_ptr + row * k
    step_groups = tl.arange(0, GROUPS_PER_STEP)  # [G]
    cols = tl.arange(0, GROUP)  # [C] input features of a group
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for first in range(0, num_groups, GROUPS_PER_STEP):
        groups = first + step_groups  # [G]
        group_mask = groups < num_groups
        offsets = groups[:, None] * GROUP + cols[None, :]  # [G, C]
        xs = tl.load(x_row + offsets, mask=group_mask[:, None], other=0.0).to(tl.float32)  # [G, C]
        mask = feature_mask[:, None] & group_mask[None, :]  # [BLOCK_N, G]
        w = tl.load(q_rows + offsets[None, :, :], mask=mask[:, :, None], other=0)  # [BLOCK_N, G, C] int8
        sums = tl.sum(w.to(tl.float32) * xs[None, :, :], axis=2)  # [BLOCK_N, G]
        s = tl.load(scale_ptr + group_rows + groups[None, :], mask=mask, other=0.0)  # [BLOCK_N, G]
        acc += tl.sum(s * sums, axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + features, mask=feature_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + features, acc.to(out_ptr.dtype.element_ty), mask=feature_mask)
