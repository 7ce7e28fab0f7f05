"""The int8 weight-only GEMV against its torch reference, on fresh random inputs (ragged N and K, bias, bf16,
several rows)."""

import pytest
import torch
from kernel_helpers import tolerance

from scaleinfer.kernels.gemm_weight_only import int8_gemm_triton
from scaleinfer.kernels.gemv import GemvConfig
from scaleinfer.kernels.gemv_int8 import int8_gemv, int8_gemv_triton, int8_linear_ref


def _inputs(m, n, k, dtype, device, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype=dtype, device=device)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(device)
    scale = (torch.rand(n, generator=g) / (127 * k**0.5)).to(device)
    b = torch.randn(n, generator=g).to(dtype=dtype, device=device) if bias else None
    return x, q, scale, b


@pytest.mark.parametrize("m,n,k,dtype,bias", [(1, 37, 300, torch.float32, False), (3, 64, 512, torch.float32, True),
                                              (1, 50, 1030, torch.bfloat16, True), (4, 16, 64, torch.bfloat16, False)])
@pytest.mark.parametrize("step_sums", [False, True])
def test_int8_gemv_matches_reference(m, n, k, dtype, bias, step_sums, device, triton_path):
    x, q, scale, b = _inputs(m, n, k, dtype, device, bias, seed=m * 7 + n * 1000 + k)
    got = int8_gemv(x, q, scale, b, GemvConfig(block_n=16, block_k=128, step_sums=step_sums))
    assert got.shape == (m, n) and got.dtype == dtype
    torch.testing.assert_close(got, int8_linear_ref(x, q, scale, b), **tolerance(dtype))


@pytest.mark.parametrize("m,n,k,dtype,bias", [(5, 37, 300, torch.float32, True), (33, 64, 512, torch.bfloat16, False),
                                              (17, 50, 130, torch.bfloat16, True)])
def test_int8_gemm_past_the_gemv_matches_reference(m, n, k, dtype, bias, device, triton_path):
    x, q, scale, b = _inputs(m, n, k, dtype, device, bias, seed=m + n + k)
    got = int8_gemm_triton(x, q, scale, b)
    assert got.shape == (m, n) and got.dtype == dtype
    torch.testing.assert_close(got, int8_linear_ref(x, q, scale, b), **tolerance(dtype))
    with pytest.raises(ValueError, match="scale has shape"):
        int8_gemm_triton(x, q, scale[:-1], b)


def test_bad_arguments_are_named(device, triton_path):
    x, q, scale, _ = _inputs(1, 4, 8, torch.float32, device, False, seed=0)
    with pytest.raises(ValueError, match="q has shape"):
        int8_gemv_triton(x, q[:, :7], scale, None)
    with pytest.raises(ValueError, match="q has dtype"):
        int8_gemv_triton(x, q.float(), scale, None)
    with pytest.raises(ValueError, match="scale has dtype"):
        int8_gemv_triton(x, q, scale.half(), None)
    with pytest.raises(ValueError, match="scale has shape"):
        int8_gemv_triton(x, q, scale[:3], None)
    with pytest.raises(ValueError, match="x has strides"):
        int8_gemv_triton(torch.randn(8, 2, device=device).t(), q, scale, None)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 6144, 4096), (1, 4096, 4096), (1, 28672, 4096), (1, 4096, 14336),
                                   (4, 4096, 14336)])
def test_int8_gemv_llama3_8b_shapes_on_gpu(m, n, k, cuda):
    x, q, scale, _ = _inputs(m, n, k, torch.bfloat16, cuda, False, seed=n + k)
    torch.testing.assert_close(int8_gemv(x, q, scale), int8_linear_ref(x, q, scale), **tolerance(torch.bfloat16))
