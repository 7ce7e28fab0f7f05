"""y = x @ (q * scale).T for fp8 (e4m3) weights: a weight-streaming GEMV for decode, and the per-token
activation quantization the fp8 matmul at larger M takes.

The FP8 schemes (layers/quant_fp8.py) store q [N, K] float8_e4m3fn and scale [N, G] float32, G groups of
group_k input features per row: G == 1 is one scale per output row (quantized on load, or a per-channel or
per-tensor checkpoint, a tensor scale repeated on its rows); group_k == 128 is a block-wise checkpoint
(HF fine-grained FP8: 128 x 128 blocks, each block's scale repeated on its 128 rows). At one to a few
tokens a decode matmul only streams its weight, so one byte per weight instead of two is the gain. Each
program owns BLOCK_N output features of one row of x and walks K with float32 partial sums: a per-row scale
applies once at the end, a block scale once per group (BLOCK_K is then the group, so each step reads one
scale per feature). No workspace, no dequantized copy of the weight.
"""

from __future__ import annotations

import torch

from scaleinfer.kernels.checks import FLOAT_DTYPES, check_bias, check_contiguous, check_dtype, check_shape
from scaleinfer.kernels.dispatch import tl, triton, use_triton
from scaleinfer.kernels.gemv import GemvConfig, float32_linear_ref

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448: e4m3fn has no infinity, and overflow is NaN unless clamped
# The best uniform tiles of the H200 sweep (bench/results/decode-gemms-quant-llama3-8b-h200-20261202-123728.json:
# within 3% of each projection's best, 48-101% of the copy rate): 4 features x 2048 per step, per-step sums.
FP8_GEMV = GemvConfig(block_n=4, block_k=2048, num_warps=4, num_stages=2, step_sums=True)
MAX_GEMV_ROWS = 4  # rows of x the GEMV takes; past it each extra row rereads the weight
MIN_TOKEN_AMAX = 1e-12  # an all-zero row gets this max |x|: its scale stays finite and its levels zero
QUANT_BLOCK_K = 1024  # features a step of a row's walk in the per-token quantization


def num_groups(k: int, group_k: int) -> int:
    return -(-k // group_k)


def expand_groups(scale: torch.Tensor, k: int, group_k: int) -> torch.Tensor:
    """scale [N, G] -> [N, k]: each group's scale on its input features."""
    return scale.repeat_interleave(group_k, dim=1)[:, :k]


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, group_k: int, dtype: torch.dtype = torch.float32
                   ) -> torch.Tensor:
    """q [N, K] e4m3, scale [N, G] -> [N, K] weights in `dtype`."""
    return (q.float() * expand_groups(scale.float(), q.shape[1], group_k)).to(dtype)


def quantize_per_token(x: torch.Tensor, static_scale: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scales [M, 1]) with x ~ q * scale: each row's own max |x| / 448
    (dynamic), or one given scale [1] (a checkpoint's static input_scale), saturated at +-448. On a GPU one
    Triton launch reads x once (the torch ops it replaces made float32 copies of x: at a prefill's M, several
    times the matmul's own reads)."""
    if use_triton(x) and x.is_contiguous():
        return quantize_per_token_triton(x, static_scale)
    return quantize_per_token_ref(x, static_scale)


def quantize_per_token_ref(x: torch.Tensor, static_scale: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    if static_scale is None:
        scale = x.abs().amax(dim=1, keepdim=True).float().clamp_min(MIN_TOKEN_AMAX) / FP8_MAX  # [M, 1]
    else:
        scale = static_scale.float().reshape(1, 1).expand(x.shape[0], 1)
    q = (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.contiguous()


@triton.jit
def round_e4m3(x):
    """x (|x| <= 448) to the nearest e4m3 value, ties to even: 3 mantissa bits, subnormal steps of 2^-9. For
    Triton's interpreter, which casts a value that rounds up into the next binade to half of it (127.6 -> 64);
    the GPU's conversion rounds to nearest even itself."""
    exponent = tl.floor(tl.log2(tl.maximum(tl.abs(x), 1e-30)))
    step = tl.exp2(tl.maximum(exponent, -6.0) - 3.0)
    magic = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds |x / step| < 2^22 to even
    return ((x / step + magic) - magic) * step


def quantize_per_token_triton(x: torch.Tensor, static_scale: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    check_shape("x", x, [None, None])
    check_dtype("x", x, FLOAT_DTYPES)
    check_contiguous("x", x)
    m, k = x.shape
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    static = static_scale.float().reshape(1) if static_scale is not None else scale  # unread when dynamic
    if m:
        _quantize_per_token_kernel[(m,)](x, q, scale, static, k, MIN_TOKEN_AMAX, FP8_MAX,
                                         STATIC=static_scale is not None, ROUND=not x.is_cuda,
                                         BLOCK_K=QUANT_BLOCK_K, num_warps=4)
    return q, scale


@triton.jit
def _quantize_per_token_kernel(x_ptr, q_ptr, scale_ptr, static_ptr, K, min_amax, fp8_max,
                               STATIC: tl.constexpr, ROUND: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program a row: its max |x| (first walk), then x / scale saturated to e4m3 (second walk, from cache).
    ROUND (off the GPU): rounded to e4m3's grid before the cast (round_e4m3)."""
    row = tl.program_id(0).to(tl.int64)
    x_row, q_row = x_ptr + row * K, q_ptr + row * K
    if STATIC:
        scale = tl.load(static_ptr)
    else:
        amax = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            amax = tl.maximum(amax, tl.abs(tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)))
        scale = tl.maximum(tl.max(amax, axis=0), min_amax) / fp8_max
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        levels = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32) / scale
        levels = tl.minimum(tl.maximum(levels, -fp8_max), fp8_max)
        if ROUND:
            levels = round_e4m3(levels)
        tl.store(q_row + cols, levels.to(q_ptr.dtype.element_ty), mask=cols < K)


def fp8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group_k: int,
             bias: torch.Tensor | None = None, config: GemvConfig = FP8_GEMV) -> torch.Tensor:
    """x: [M, K] float, q: [N, K] e4m3, scale: [N, cdiv(K, group_k)] float32 -> [M, N] in x's dtype."""
    if use_triton(x):
        return fp8_gemv_triton(x, q, scale, group_k, bias, config)
    return fp8_linear_ref(x, q, scale, group_k, bias)


def fp8_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group_k: int,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: float32 products of x and the dequantized weight."""
    return float32_linear_ref(x, dequantize_fp8(q, scale, group_k), bias)


def fp8_gemv_triton(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group_k: int,
                    bias: torch.Tensor | None, config: GemvConfig = FP8_GEMV) -> torch.Tensor:
    _check(x, q, scale, group_k, bias)
    m, k = x.shape
    n, groups = scale.shape
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_k = config.block_k if groups == 1 else group_k  # a block scale: one group per step
    _fp8_gemv_kernel[(triton.cdiv(n, config.block_n), m)](
        x, q, scale, bias if bias is not None else out, out, n, k, groups,
        PER_ROW=groups == 1, HAS_BIAS=bias is not None, BLOCK_N=config.block_n, BLOCK_K=block_k,
        STEP_SUMS=config.step_sums, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def _check(x, q, scale, group_k, bias) -> None:
    check_shape("x", x, [None, None])
    k = x.shape[1]
    check_shape("q", q, [None, k])
    n = q.shape[0]
    groups = num_groups(k, group_k)
    if groups > 1 and (group_k < 16 or group_k & (group_k - 1)):
        raise ValueError(f"group_k is {group_k}: a block-scaled GEMV needs a power of two >= 16")
    check_shape("scale", scale, [n, groups])
    check_dtype("x", x, FLOAT_DTYPES)
    check_dtype("q", q, (FP8_DTYPE,))
    check_dtype("scale", scale, (torch.float32,))
    for name, t in (("x", x), ("q", q), ("scale", scale)):
        check_contiguous(name, t)
    check_bias(bias, n, x.dtype)


@triton.jit
def _fp8_gemv_kernel(x_ptr, q_ptr, scale_ptr, bias_ptr, out_ptr, n, k, groups, PER_ROW: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     STEP_SUMS: tl.constexpr):
    row = tl.program_id(1).to(tl.int64)
    features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    feature_mask = features < n
    q_rows = q_ptr + features.to(tl.int64)[:, None] * k  # [BLOCK_N, 1]
    scale_rows = scale_ptr + features.to(tl.int64) * groups  # [BLOCK_N]
    x_row = x_ptr + row * k
    if PER_ROW and not STEP_SUMS:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    y = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        col_mask = cols < k
        xs = tl.load(x_row + cols, mask=col_mask, other=0.0).to(tl.float32)
        w = tl.load(q_rows + cols[None, :], mask=feature_mask[:, None] & col_mask[None, :], other=0.0)
        if PER_ROW and not STEP_SUMS:
            acc += w.to(tl.float32) * xs[None, :]
        elif PER_ROW:
            y += tl.sum(w.to(tl.float32) * xs[None, :], axis=1)
        else:  # BLOCK_K is the group: one scale per feature for this step
            s = tl.load(scale_rows + start // BLOCK_K, mask=feature_mask, other=0.0)  # [BLOCK_N]
            y += tl.sum(w.to(tl.float32) * xs[None, :], axis=1) * s
    if PER_ROW and not STEP_SUMS:
        y = tl.sum(acc, axis=1)
    if PER_ROW:
        y = y * tl.load(scale_rows, mask=feature_mask, other=0.0)  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(bias_ptr + features, mask=feature_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + features, y.to(out_ptr.dtype.element_ty), mask=feature_mask)
