"""Fused residual-add + RMSNorm kernel against its torch reference."""

import pytest
import torch
from kernel_helpers import tolerance

from scaleinfer.kernels.rms_norm import rms_norm, rms_norm_ref, rms_norm_triton

CASES = [  # (num_tokens, hidden, with residual, dtype, weight dtype)
    (3, 64, False, torch.float32, torch.float32),
    (5, 96, True, torch.float32, torch.float32),
    (4, 128, True, torch.bfloat16, torch.bfloat16),
    (1, 80, False, torch.bfloat16, torch.bfloat16),
    (2, 64, True, torch.bfloat16, torch.float32),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_rms_norm_matches_reference(case, device, triton_path):
    num_tokens, hidden, with_residual, dtype, weight_dtype = CASES[case]
    torch.manual_seed(100 + case)
    x = torch.randn(num_tokens, 2 * hidden, dtype=dtype, device=device)[:, :hidden]  # strided rows
    weight = torch.randn(hidden, dtype=weight_dtype, device=device)
    residual = torch.randn(num_tokens, hidden, dtype=dtype, device=device) if with_residual else None
    got = rms_norm(x, weight, 1e-6, residual)
    expected = rms_norm_ref(x, weight, 1e-6, residual)
    if with_residual:
        # The sum is one rounding either way; the interpreter rounds float32 to bfloat16 toward zero.
        exact = device.type == "cuda" or dtype == torch.float32
        torch.testing.assert_close(got[1], expected[1], **(dict(atol=0, rtol=0) if exact else tolerance(dtype)))
        got, expected = got[0], expected[0]
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, **tolerance(dtype))


def gemma_norm(x, weight, eps):
    """Gemma's RMSNorm as HF writes it: float32 throughout, times (1 + weight), rounded once."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())).type_as(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_with_weight_offset_is_gemmas(dtype, with_residual, device, triton_path):
    torch.manual_seed(110)
    x = torch.randn(4, 2 * 96, dtype=dtype, device=device)[:, :96]
    weight = 0.5 * torch.randn(96, dtype=dtype, device=device)
    residual = torch.randn(4, 96, dtype=dtype, device=device) if with_residual else None
    got = rms_norm(x, weight, 1e-6, residual, weight_offset=1.0)
    expected = rms_norm_ref(x, weight, 1e-6, residual, weight_offset=1.0)
    if with_residual:
        torch.testing.assert_close(got[1], expected[1], **tolerance(dtype))
        got, expected, x = got[0], expected[0], expected[1]
    assert got.dtype == expected.dtype == dtype
    torch.testing.assert_close(got, expected, **tolerance(dtype))
    torch.testing.assert_close(expected, gemma_norm(x, weight, 1e-6), atol=0, rtol=0)


def test_rms_norm_leaves_inputs_alone(device, triton_path):
    torch.manual_seed(7)
    x, residual = torch.randn(2, 32, device=device), torch.randn(2, 32, device=device)
    x0, residual0 = x.clone(), residual.clone()
    rms_norm(x, torch.ones(32, device=device), 1e-5, residual)
    assert torch.equal(x, x0) and torch.equal(residual, residual0)


def test_rms_norm_launcher_rejects_bad_arguments(device, triton_path):
    x = torch.randn(2, 32, device=device)
    with pytest.raises(ValueError, match="weight has shape"):
        rms_norm_triton(x, torch.ones(31, device=device), 1e-5)
    with pytest.raises(ValueError, match="residual has dtype"):
        rms_norm_triton(x, torch.ones(32, device=device), 1e-5, x.half())
    with pytest.raises(ValueError, match="x has strides"):
        rms_norm_triton(x.t(), torch.ones(2, device=device), 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 256, 2048])
def test_rms_norm_gpu(num_tokens, cuda):
    torch.manual_seed(num_tokens)
    x, residual = (torch.randn(num_tokens, 4096, dtype=torch.bfloat16, device=cuda) for _ in range(2))
    weight = torch.randn(4096, dtype=torch.bfloat16, device=cuda)
    (out, res), (ref_out, ref_res) = rms_norm(x, weight, 1e-5, residual), rms_norm_ref(x, weight, 1e-5, residual)
    torch.testing.assert_close(res, ref_res, atol=0, rtol=0)
    torch.testing.assert_close(out, ref_out, **tolerance(torch.bfloat16))


@pytest.mark.gpu
def test_rms_norm_weight_offset_gpu(cuda):
    torch.manual_seed(3)
    x, residual = (torch.randn(256, 2304, dtype=torch.bfloat16, device=cuda) for _ in range(2))
    weight = torch.randn(2304, dtype=torch.bfloat16, device=cuda)
    got, expected = (f(x, weight, 1e-6, residual, weight_offset=1.0) for f in (rms_norm, rms_norm_ref))
    torch.testing.assert_close(got[1], expected[1], atol=0, rtol=0)
    torch.testing.assert_close(got[0], expected[0], **tolerance(torch.bfloat16))
