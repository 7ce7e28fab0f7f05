"""y = (x @ q.T) * scale for int8 weights with per-output-row scales: a weight-streaming GEMV for decode.

The weight-only INT8 scheme (layers/quant_int8.py) stores q [N, K] int8 and scale [N] float32, w ~ q * scale.
At one to a few tokens a decode matmul only streams its weight, so reading one byte per weight instead of two
is the gain. Each program owns BLOCK_N output features of one row of x, walks K in BLOCK_K steps with float32
partial sums in registers and applies the row scales once at the end (a per-row scale factors out of the
sum): one kernel, no workspace, no dequantized copy of the weight.
"""

from __future__ import annotations

import torch

from scaleinfer.kernels.checks import FLOAT_DTYPES, check_bias, check_contiguous, check_dtype, check_shape
from scaleinfer.kernels.dispatch import tl, triton, use_triton
from scaleinfer.kernels.gemv import GemvConfig

# The best uniform tiles of the H200 sweep (bench/results/decode-gemms-quant-llama3-8b-h200-20261202-123728.json:
# within 3% of each projection's best, 48-101% of the copy rate): 4 features x 2048 per step, per-step sums.
INT8_GEMV = GemvConfig(block_n=4, block_k=2048, num_warps=4, num_stages=2, step_sums=True)
MAX_GEMV_ROWS = 4  # rows of x the GEMV takes; past it each extra row rereads the weight, so dequantize + GEMM


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
              config: GemvConfig = INT8_GEMV) -> torch.Tensor:
    """x: [M, K] float, q: [N, K] int8, scale: [N] float32 -> [M, N] in x's dtype."""
    if use_triton(x):
        return int8_gemv_triton(x, q, scale, bias, config)
    return int8_linear_ref(x, q, scale, bias)


def int8_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: float32 products of x and the integer levels, scaled per output row."""
    y = (x.float() @ q.float().T) * scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int8_gemv_triton(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                     config: GemvConfig = INT8_GEMV) -> torch.Tensor:
    _check(x, q, scale, bias)
    (m, k), n = x.shape, q.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, config.block_n), m)
    _int8_gemv_kernel[grid](
        x, q, scale, bias if bias is not None else out, out, n, k,
        HAS_BIAS=bias is not None, BLOCK_N=config.block_n, BLOCK_K=config.block_k, STEP_SUMS=config.step_sums,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def _check(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    """The int8 operands (the GEMV's and kernels/gemm_weight_only.py's): x [M, K] float, q [N, K] int8, scale [N]
    float32, all contiguous, and the optional bias [N]."""
    check_shape("x", x, [None, None])
    check_shape("q", q, [None, x.shape[1]])
    n = q.shape[0]
    check_shape("scale", scale, [n])
    check_dtype("x", x, FLOAT_DTYPES)
    check_dtype("q", q, (torch.int8,))
    check_dtype("scale", scale, (torch.float32,))
    for name, t in (("x", x), ("q", q), ("scale", scale)):
        check_contiguous(name, t)
    check_bias(bias, n, x.dtype)


@triton.jit
def _int8_gemv_kernel(x_ptr, q_ptr, scale_ptr, bias_ptr, out_ptr, n, k, HAS_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STEP_SUMS: tl.constexpr):
    row = tl.program_id(1).to(tl.int64)
    features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    feature_mask = features < n
    q_rows = q_ptr + features.to(tl.int64)[:, None] * k  # [BLOCK_N, 1]
    x_row = x_ptr + row * k
    if STEP_SUMS:  # noqa: SIM108 (a constexpr branch: Triton compiles one side, each with its own shape)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        col_mask = cols < k
        xs = tl.load(x_row + cols, mask=col_mask, other=0.0).to(tl.float32)
        w = tl.load(q_rows + cols[None, :], mask=feature_mask[:, None] & col_mask[None, :], other=0)
        if STEP_SUMS:
            acc += tl.sum(w.to(tl.float32) * xs[None, :], axis=1)
        else:
            acc += w.to(tl.float32) * xs[None, :]
    if not STEP_SUMS:
        acc = tl.sum(acc, axis=1)
    y = acc * tl.load(scale_ptr + features, mask=feature_mask, other=0.0)  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(bias_ptr + features, mask=feature_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + features, y.to(out_ptr.dtype.element_ty), mask=feature_mask)
