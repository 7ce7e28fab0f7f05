"""y = x @ (q * scale).T for fp8 (e4m3) or int8 weight levels at more rows than the GEMV takes, dequantized
tile by tile.

The weight-only matmul past the GEMVs' few rows (kernels/gemv_fp8.py, gemv_int8.py): fp8 block-wise checkpoints
(a scale per group of group_k input features and per row, kernels/gemv_fp8.py's layout), fp8 per-row scales on
GPUs without fp8 tensor cores, int8 per-row scales (whose levels -127..127 are exact in bf16 and fp16) and int8
group scales (GGUF Q8_0: groups of 32, kernels/gemv_int8_groups.py's layout).
Each program owns a BLOCK_M x BLOCK_N tile of y and walks K one group at a time (BLOCK_K is the group for
block scales): the level tile is cast to x's dtype for the tensor-core dot, and the group's partial sums are
scaled by the tile's rows' scale for that group before they join the float32 accumulator, which is exactly
sum_g (x_g @ q_g.T) * s_g. No dequantized copy of the weight is ever written (casting the whole weight for
cuBLAS writes twice the bytes it reads, every step).
"""

from __future__ import annotations

import torch

from scaleinfer.kernels.dispatch import dot_args, mma, tl, triton
from scaleinfer.kernels.gemv_fp8 import FP8_DTYPE
from scaleinfer.kernels.gemv_fp8 import _check as _check_fp8
from scaleinfer.kernels.gemv_int8 import _check as _check_int8
from scaleinfer.kernels.gemv_int8_groups import _check as _check_int8_groups

GPU_TILES = dict(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3)
INTERPRETER_TILES = dict(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=1)


def fp8_gemm_triton(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group_k: int,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] float, q: [N, K] e4m3, scale: [N, cdiv(K, group_k)] float32 -> [M, N] in x's dtype."""
    _check_fp8(x, q, scale, group_k, bias)
    return _weight_only_gemm(x, q, scale, group_k, bias)


def int8_gemm_triton(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] float, q: [N, K] int8, scale: [N] float32 (one per output row) -> [M, N] in x's dtype."""
    _check_int8(x, q, scale, bias)
    return _weight_only_gemm(x, q, scale.view(-1, 1), x.shape[1], bias)


def int8_groups_gemm_triton(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] float, q: [N, K] int8, scale: [N, K // group] float32 (a scale per group of a row) -> [M, N]."""
    _check_int8_groups(x, q, scale, bias)
    return _weight_only_gemm(x, q, scale, x.shape[1] // scale.shape[1], bias)


def _weight_only_gemm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group_k: int,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """Checked operands: x [M, K], q [N, K] levels, scale [N, cdiv(K, group_k)] -> [M, N] in x's dtype."""
    assert q.dtype in (FP8_DTYPE, torch.int8)
    m, k = x.shape
    n, groups = scale.shape
    tiles = GPU_TILES if x.is_cuda else INTERPRETER_TILES
    block_k = tiles["block_k"] if groups == 1 else group_k
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, tiles["block_m"]), triton.cdiv(n, tiles["block_n"]))
    _weight_only_gemm_kernel[grid](
        x, q, scale, bias if bias is not None else out, out, m, n, k, groups,
        PER_ROW=groups == 1, HAS_BIAS=bias is not None, BLOCK_M=tiles["block_m"], BLOCK_N=tiles["block_n"],
        BLOCK_K=block_k, **dot_args(x), num_warps=tiles["num_warps"], num_stages=tiles["num_stages"],
    )
    return out


@triton.jit(do_not_specialize=["m"])
def _weight_only_gemm_kernel(x_ptr, q_ptr, scale_ptr, bias_ptr, out_ptr, m, n, k, groups, PER_ROW: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    features = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_mask, feature_mask = rows < m, features < n
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * k  # [BLOCK_M, 1]
    q_rows = q_ptr + features.to(tl.int64)[:, None] * k  # [BLOCK_N, 1]
    scale_rows = scale_ptr + features.to(tl.int64) * groups  # [BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_mask = cols < k
        xs = tl.load(x_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        w = tl.load(q_rows + cols[None, :], mask=feature_mask[:, None] & col_mask[None, :], other=0.0)
        # Through float32: exact for int8 and e4m3 levels, and the interpreter casts int8 to bf16 as raw bits.
        part = mma(xs, tl.trans(w.to(tl.float32).to(xs.dtype)), UPCAST, PRECISION)  # [BLOCK_M, BLOCK_N]
        if PER_ROW:
            acc += part
        else:  # this group's scale of each feature
            acc += part * tl.load(scale_rows + start // BLOCK_K, mask=feature_mask, other=0.0)[None, :]
    if PER_ROW:
        acc = acc * tl.load(scale_rows, mask=feature_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + features, mask=feature_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows.to(tl.int64)[:, None] * n + features[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & feature_mask[None, :])
