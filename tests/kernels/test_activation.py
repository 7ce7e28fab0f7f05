"""Gated activation kernels (SiLU, GELU-tanh) against their torch references."""

import pytest
import torch
from kernel_helpers import tolerance

from scaleinfer.kernels.activation import (
    act_and_mul_triton,
    gelu_tanh_and_mul,
    gelu_tanh_and_mul_ref,
    silu_and_mul,
    silu_and_mul_ref,
    silu_and_mul_triton,
)

OPS = {"silu": (silu_and_mul, silu_and_mul_ref), "gelu_tanh": (gelu_tanh_and_mul, gelu_tanh_and_mul_ref)}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("num_tokens,d,dtype", [(3, 48, torch.float32), (2, 1100, torch.float32),
                                                (4, 64, torch.bfloat16), (1, 200, torch.bfloat16)])
def test_act_and_mul_matches_reference(op, num_tokens, d, dtype, device, triton_path):
    torch.manual_seed(num_tokens * 1000 + d)
    x = 3 * torch.randn(num_tokens, 2 * d, dtype=dtype, device=device)
    run, ref = OPS[op]
    got = run(x)
    assert got.shape == (num_tokens, d) and got.dtype == dtype
    torch.testing.assert_close(got, ref(x), **tolerance(dtype))


def test_gelu_tanh_reference_is_the_tanh_approximation():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    gate = x[:, None].repeat(1, 2)
    exact = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))
    torch.testing.assert_close(gelu_tanh_and_mul_ref(gate)[:, 0], exact * x)


def test_act_and_mul_rejects_bad_arguments(device, triton_path):
    with pytest.raises(ValueError, match="must be even"):
        silu_and_mul_triton(torch.randn(2, 7, device=device))
    with pytest.raises(ValueError, match="activation is 'relu'"):
        act_and_mul_triton(torch.randn(2, 8, device=device), "relu")


@pytest.mark.gpu
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("num_tokens", [1, 64, 2048])
def test_act_and_mul_gpu(op, num_tokens, cuda):
    torch.manual_seed(num_tokens)
    x = torch.randn(num_tokens, 2 * 14336, dtype=torch.bfloat16, device=cuda)
    run, ref = OPS[op]
    torch.testing.assert_close(run(x), ref(x), **tolerance(torch.bfloat16))
