"""y = x @ W.T for one row (batch-1 decode): a weight-streaming GEMV.

At one to a few tokens a decode GEMM only streams its weight; cuBLAS picks split-K kernels for the
narrow projections (o_proj, down_proj) that add a reduce kernel and reach well under the copy bandwidth
(bench/decode_gemms.py). Here each program owns BLOCK_N output features, walks the whole K dimension in
BLOCK_K steps, and keeps float32 partial sums in registers: one kernel, no workspace,
no atomics, and the same result whatever the launch order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scaleinfer.kernels.checks import FLOAT_DTYPES, check_contiguous, check_dtype, check_same_dtype, check_shape
from scaleinfer.kernels.dispatch import tl, triton, use_triton


@dataclass(slots=True, frozen=True)
class GemvConfig:
    block_n: int = 16
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 3
    # The quantized GEMVs: sum each K step's products into [block_n] partials (True) instead of carrying a
    # [block_n, block_k] float32 tile in registers to one sum at the end.
    step_sums: bool = False


# Tile sizes measured on an H100 (bench/decode_gemms.py, Llama-3-8B shapes, against cuBLAS in the same run):
# wide outputs (gate_up, LM head) stream best with 32 features x 1024 per step and 8 warps; narrow or square
# ones (o_proj, down_proj) with 8 features and 4 warps, where cuBLAS splits K and adds a reduce kernel. In
# between (qkv_proj) cuBLAS was as fast, so it keeps it.
WIDE = GemvConfig(block_n=32, block_k=1024, num_warps=8, num_stages=1)
NARROW = GemvConfig(block_n=8, block_k=1024, num_warps=4, num_stages=3)
WIDE_FEATURES = 16384
# On an H200 (bench/results/decode-gemms-llama3-8b-h200-20261202-055205.json, torch 2.11) cuBLAS's kernels
# stream gate_up (56.6 us vs 64.5), down_proj (31.2 vs 32.7), qkv_proj and the LM head (248 vs 262) faster
# than any tile of the sweep; only the square o_proj is faster here (11.8 us vs 12.5).
SQUARE_ONLY_CARDS = ("H200",)


def decode_config(out_features: int, in_features: int, card: str = "") -> GemvConfig | None:
    """The GEMV tiles for a batch-1 [out_features, in_features] weight on `card` (the CUDA device's name),
    or None where cuBLAS is as fast."""
    if any(name in card for name in SQUARE_ONLY_CARDS):
        return NARROW if out_features == in_features else None
    if out_features >= WIDE_FEATURES:
        return WIDE
    return NARROW if out_features <= in_features else None


@functools.cache
def card_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else ""


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the GEMV kernel for one contiguous row on the GPU where it streams the weight faster."""
    if x.shape[0] == 1 and x.dim() == 2 and use_triton(x) and x.is_contiguous() and weight.is_contiguous():
        config = decode_config(*weight.shape, card_name(x.device))
        if config is not None and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype):
            return gemv_triton(x, weight, bias, config)
    return F.linear(x, weight, bias)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None) -> torch.Tensor:
    """x: [1, K], weight: [N, K] -> [1, N] in x's dtype."""
    if use_triton(x):
        return gemv_triton(x, weight, bias, config or GemvConfig())
    return gemv_ref(x, weight, bias)


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def float32_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The quantized schemes' reference: x [M, K] times a dequantized float32 weight [N, K], the bias added in
    float32, -> [M, N] in x's dtype."""
    y = x.float() @ weight.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def gemv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: GemvConfig) -> torch.Tensor:
    check_shape("x", x, [1, None])
    k = x.shape[1]
    check_shape("weight", weight, [None, k])
    check_dtype("x", x, FLOAT_DTYPES)
    check_same_dtype("weight", weight, x)
    check_contiguous("x", x)
    check_contiguous("weight", weight)
    n = weight.shape[0]
    if bias is not None:
        check_shape("bias", bias, [n])
        check_same_dtype("bias", bias, x)
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, config.block_n),)
    _gemv_kernel[grid](
        x, weight, bias if bias is not None else out, out, n, k,
        HAS_BIAS=bias is not None, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, n, k, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    feature_mask = features < n
    w_rows = w_ptr + features.to(tl.int64)[:, None] * k  # [BLOCK_N, 1]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        col_mask = cols < k
        xs = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        w = tl.load(w_rows + cols[None, :], mask=feature_mask[:, None] & col_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * xs[None, :]
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(bias_ptr + features, mask=feature_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + features, y.to(out_ptr.dtype.element_ty), mask=feature_mask)
