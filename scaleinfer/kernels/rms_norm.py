"""RMSNorm fused with the residual add before it: one read of x (and residual), one write of each output.

HF order: the sum x + residual is rounded to x's dtype (it is the next residual), its variance is taken
in float32, the normalized row is cast back to x's dtype and only then multiplied by the weight.

Gemma scales by (1 + weight) and in its own order: the normalized row times (weight_offset + weight), all
in float32, rounded to x's dtype once. A nonzero weight_offset selects that form (a constexpr: the
Llama form compiles as before).
"""

from __future__ import annotations

import torch

from scaleinfer.kernels.checks import (
    FLOAT_DTYPES,
    check_device,
    check_dtype,
    check_last_dim_contiguous,
    check_same_dtype,
    check_shape,
    checking,
)
from scaleinfer.kernels.dispatch import tl, triton, use_triton


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    weight_offset: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x: [num_tokens, hidden]; weight: [hidden]. Out of place.

    Without residual: norm(x). With it: (norm(x + residual), x + residual), the sum in x's dtype.
    The output's dtype is weight's and x's promoted (x's when they match); with a weight_offset, x's.
    """
    if use_triton(x):
        return rms_norm_triton(x, weight, eps, residual, weight_offset)
    return rms_norm_ref(x, weight, eps, residual, weight_offset)


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    weight_offset: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    gemma = weight_offset != 0.0
    out = (xf * (weight_offset + weight.float())).to(x.dtype) if gemma else weight * xf.to(x.dtype)
    return out if residual is None else (out, x)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    weight_offset: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if checking():
        _check(x, weight, residual)
    num_tokens, hidden = x.shape
    out_dtype = x.dtype if weight_offset else torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    new_residual = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else out
    res = residual if residual is not None else x  # unread when HAS_RESIDUAL is off
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_tokens,)](
        x, res, weight, out, new_residual,
        x.stride(0), res.stride(0), out.stride(0), new_residual.stride(0), hidden, eps,
        HAS_RESIDUAL=residual is not None, WEIGHT_OFFSET=float(weight_offset), BLOCK=block,
        num_warps=min(max(block // 512, 1), 16),
    )
    return out if residual is None else (out, new_residual)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    check_shape("x", x, [None, None])
    check_dtype("x", x, FLOAT_DTYPES)
    check_last_dim_contiguous("x", x)
    check_shape("weight", weight, [x.shape[1]])
    check_dtype("weight", weight, FLOAT_DTYPES)
    check_last_dim_contiguous("weight", weight)
    check_device(x.device, weight=weight)
    if residual is not None:
        check_shape("residual", residual, list(x.shape))
        check_same_dtype("residual", residual, x)
        check_last_dim_contiguous("residual", residual)
        check_device(x.device, residual=residual)


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr,
    x_stride, res_stride, out_stride, new_res_stride, hidden, eps,
    HAS_RESIDUAL: tl.constexpr, WEIGHT_OFFSET: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per token row; the whole row sits in registers (BLOCK >= hidden).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(new_res_ptr + row * new_res_stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if WEIGHT_OFFSET != 0.0:  # Gemma: float32 throughout, one rounding
        out = xf * rstd * (WEIGHT_OFFSET + w)
    else:
        out = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)
