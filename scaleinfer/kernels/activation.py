"""Gated MLP activations, act(gate) * up over the two halves of one row: SiLU (Llama) and GELU with the
tanh approximation (GeGLU: Gemma, gelu_pytorch_tanh)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scaleinfer.kernels.checks import FLOAT_DTYPES, check_dtype, check_last_dim_contiguous, check_shape
from scaleinfer.kernels.dispatch import tl, triton, use_triton

BLOCK = 1024
ACTIVATIONS = ("silu", "gelu_tanh")


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * d] (gate then up) -> [num_tokens, d], new tensor of x's dtype."""
    if use_triton(x):
        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * d] (gate then up) -> gelu_tanh(gate) * up, [num_tokens, d] in x's dtype."""
    if use_triton(x):
        return gelu_tanh_and_mul_triton(x)
    return gelu_tanh_and_mul_ref(x)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    return act_and_mul_triton(x, "silu")


def gelu_tanh_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    return act_and_mul_triton(x, "gelu_tanh")


def act_and_mul_triton(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation is {activation!r}, expected one of {ACTIVATIONS}")
    check_shape("x", x, [None, None])
    check_dtype("x", x, FLOAT_DTYPES)
    check_last_dim_contiguous("x", x)
    if x.shape[1] % 2:
        raise ValueError(f"x has shape {list(x.shape)}: its last dimension must be even (gate then up)")
    num_tokens, d = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_tokens, d, dtype=x.dtype, device=x.device)
    block = min(BLOCK, triton.next_power_of_2(d))
    _act_and_mul_kernel[(num_tokens, triton.cdiv(d, block))](
        x, out, x.stride(0), out.stride(0), d, ACTIVATION=activation, BLOCK=block, num_warps=4
    )
    return out


@triton.jit
def _act_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, d, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + d + cols, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION == "silu":
        act = gate / (1.0 + tl.exp(-gate))
    else:
        # 0.5 * g * (1 + tanh(u)) is g * sigmoid(2u): no tanh needed, and no cancellation near u = 0.
        u = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)  # sqrt(2 / pi) * (...)
        act = gate / (1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0)))  # capped: e^80 already makes act ~0
    # The activation rounds to the run dtype before the product, as act(gate) * up does in torch.
    act = act.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)
