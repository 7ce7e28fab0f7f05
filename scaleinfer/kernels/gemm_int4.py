"""y = x @ W.T for group-wise INT4 weights at more rows than the GEMV takes, dequantized group by group (the
int4 layers' matmul for 5..512 rows where torch's tinygemm does not take them: layers/quant_int4.py).

The format is kernels/gemv_int4.py's (packed [N, K // 2] uint8, even column in the low nibble; scale and zero
[N, G] float32; w = (q - 8) * scale + zero per group). Each program owns a BLOCK_M x BLOCK_N tile of y and
walks K one group per step: it unpacks the group's bytes into signed levels (-8..7, exact in bf16 and fp16),
multiplies them on the tensor cores, and applies the group's scale and zero to the partial sums,

    sum_c x_c w_c = scale_g * sum_c x_c (q_c - 8) + zero_g * sum_c x_c,

so no dequantized weight is written (casting the whole weight for cuBLAS writes four times the bytes it
reads, every step) and the scale multiplies [BLOCK_M, BLOCK_N] sums, not every weight.
"""

from __future__ import annotations

import torch

from scaleinfer.kernels.dispatch import dot_args, mma, tl, triton
from scaleinfer.kernels.gemv_int4 import _check

GPU_TILES = dict(block_n=128, num_warps=4, num_stages=3)
INTERPRETER_TILES = dict(block_n=16, num_warps=4, num_stages=1)


def int4_gemm_triton(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] float -> [M, N] in x's dtype."""
    _check(x, packed, scale, zero, bias)
    (m, k), n, num_groups = x.shape, packed.shape[0], scale.shape[1]
    tiles = GPU_TILES if x.is_cuda else INTERPRETER_TILES
    block_m = min(64, max(16, triton.next_power_of_2(m)))  # a dot needs 16 rows; few rows waste less
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, tiles["block_n"]))
    _int4_gemm_kernel[grid](
        x, packed, scale, zero, bias if bias is not None else out, out, m, n, k, num_groups,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=tiles["block_n"], HALF_GROUP=k // num_groups // 2,
        **dot_args(x), num_warps=tiles["num_warps"], num_stages=tiles["num_stages"],
    )
    return out


@triton.jit(do_not_specialize=["m"])
def _int4_gemm_kernel(x_ptr, q_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, m, n, k, num_groups,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      HALF_GROUP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    features = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_mask, feature_mask = rows < m, features < n
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * k  # [BLOCK_M, 1]
    q_rows = q_ptr + features.to(tl.int64)[:, None] * (k // 2)  # [BLOCK_N, 1]
    group_rows = features.to(tl.int64) * num_groups  # [BLOCK_N] offsets into scale and zero
    half = tl.arange(0, HALF_GROUP)  # byte columns of a group
    cols = tl.arange(0, 2 * HALF_GROUP)  # input features of a group
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, num_groups):
        byte = tl.load(q_rows + g * HALF_GROUP + half[None, :], mask=feature_mask[:, None], other=0)  # [BLOCK_N, H]
        levels = tl.interleave(byte & 0xF, byte >> 4)  # [BLOCK_N, 2H]: column 2p is the low nibble of byte p
        xs = tl.load(x_rows + g * 2 * HALF_GROUP + cols[None, :], mask=row_mask[:, None], other=0.0)  # [BLOCK_M, 2H]
        # Levels minus the zero point (8), through float32: the interpreter casts integers to bf16 as raw bits.
        signed = (levels.to(tl.float32) - 8.0).to(xs.dtype)
        part = mma(xs, tl.trans(signed), UPCAST, PRECISION)  # [BLOCK_M, BLOCK_N]
        s = tl.load(scale_ptr + group_rows + g, mask=feature_mask, other=0.0)  # [BLOCK_N]
        z = tl.load(zero_ptr + group_rows + g, mask=feature_mask, other=0.0)
        x_sums = tl.sum(xs.to(tl.float32), axis=1)  # [BLOCK_M]
        acc += part * s[None, :] + x_sums[:, None] * z[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + features, mask=feature_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows.to(tl.int64)[:, None] * n + features[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & feature_mask[None, :])
