"""The fp8 GEMV and the weight-only fp8 GEMM past it (per-row and block scales) against their torch reference, on
fresh random inputs and odd shapes; on the GPU also inside a CUDA graph, and the scheme's matmul at every row
count."""

from dataclasses import replace

import pytest
import torch

from scaleinfer.kernels.gemm_weight_only import fp8_gemm_triton
from scaleinfer.kernels.gemv import GemvConfig
from scaleinfer.kernels.gemv_fp8 import (
    FP8_DTYPE,
    fp8_gemv,
    fp8_gemv_triton,
    fp8_linear_ref,
    quantize_per_token,
    quantize_per_token_ref,
    quantize_per_token_triton,
)

SMALL = GemvConfig(block_n=16, block_k=64, num_warps=4, num_stages=1)  # several K steps on small shapes


def weights(n, k, group_k, device):
    q = (torch.randn(n, k, device=device) * 100).clamp(-448, 448).to(FP8_DTYPE)
    scale = torch.rand(n, -(-k // group_k), device=device) * 1e-3 + 1e-4
    return q, scale


@pytest.mark.parametrize("m, n, k, group_k", [(1, 37, 200, 200), (3, 48, 130, 130), (4, 33, 256, 128),
                                              (2, 50, 300, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("step_sums", [False, True])
def test_fp8_gemv_matches_its_reference(m, n, k, group_k, dtype, step_sums, device, triton_path):
    torch.manual_seed(m * n + k)
    q, scale = weights(n, k, group_k, device)
    x, bias = torch.randn(m, k, dtype=dtype, device=device), torch.randn(n, dtype=dtype, device=device)
    got = fp8_gemv(x, q, scale, group_k, bias, config=replace(SMALL, step_sums=step_sums))
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(got, fp8_linear_ref(x, q, scale, group_k, bias), **tol)
    if scale.shape[1] > 1:  # the block scales are honoured: one scale per row gives another answer
        rowwise = fp8_linear_ref(x, q, scale[:, :1].contiguous(), k, bias)
        assert not torch.allclose(got.float(), rowwise.float(), atol=1e-2, rtol=1e-2)


def test_fp8_gemv_launcher_names_bad_arguments(device, triton_path):
    q, scale = weights(16, 64, 64, device)
    x = torch.randn(1, 64, device=device)
    with pytest.raises(ValueError, match="q has dtype torch.float32"):
        fp8_gemv_triton(x, q.float(), scale, 64, None)
    with pytest.raises(ValueError, match=r"scale has shape \[16, 1\], expected \[16, 2\]"):
        fp8_gemv_triton(x, q, scale, 32, None)
    with pytest.raises(ValueError, match="group_k is 24"):
        fp8_gemv_triton(x, q, torch.ones(16, 3, device=device), 24, None)
    with pytest.raises(ValueError, match=r"x has shape \[1, 2, 32\], expected \[\*, \*\]"):
        quantize_per_token_triton(x.view(1, 2, 32))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 4, 16])
@pytest.mark.parametrize("group_k", [None, 128])
def test_fp8_linear_captured_in_a_cuda_graph_matches_its_reference(m, group_k, cuda):
    """GEMV up to 4 rows, past it _scaled_mm (per-row scales, dynamic per-token activations) or the dequantized
    matmul (blocks); odd N; captured, replayed on fresh inputs."""
    from scaleinfer.layers.quant_fp8 import fp8_linear

    torch.manual_seed(m)
    n, k = 4100, 1024
    q, scale = weights(n, k, group_k or k, cuda)
    x = torch.randn(m, k, dtype=torch.bfloat16, device=cuda)
    fp8_linear(x, q, scale, group_k or k)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fp8_linear(x, q, scale, group_k or k)
    x.copy_(torch.randn_like(x))
    graph.replay()
    want = fp8_linear_ref(x, q, scale, group_k or k).float()
    assert ((y.float() - want).norm() / want.norm()) < 0.05  # per-token e4m3 activations past the GEMV
    if m <= 4:
        torch.testing.assert_close(y, want.to(y.dtype), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("m, n, k, group_k", [(5, 37, 200, 200), (33, 48, 96, 32), (17, 50, 128, 64), (9, 40, 100, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm_matches_its_reference(m, n, k, group_k, dtype, device, triton_path):
    """Past the GEMV's rows, weight-only: per-row scales, and block scales applied group by group."""
    torch.manual_seed(m + n + k)
    q, scale = weights(n, k, group_k, device)
    x, bias = torch.randn(m, k, dtype=dtype, device=device), torch.randn(n, dtype=dtype, device=device)
    got = fp8_gemm_triton(x, q, scale, group_k, bias)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(got, fp8_linear_ref(x, q, scale, group_k, bias), **tol)


def _quantization_inputs(m, k, dtype, device):
    x = torch.randn(m, k, device=device) * torch.logspace(-3, 2, m, device=device)[:, None]  # rows of every size
    if m > 1:
        x[0] = 0  # an all-zero row
    return x.to(dtype)


@pytest.mark.parametrize("m, k", [(1, 1000), (5, 3000), (3, 1024), (7, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("static", [False, True])
def test_per_token_quantization_matches_its_reference(m, k, dtype, static, device, triton_path):
    """Walks over K of more and fewer than a block; a static scale small enough to saturate rows at +-448."""
    torch.manual_seed(m + k)
    x = _quantization_inputs(m, k, dtype, device)
    static_scale = torch.tensor([0.05], device=device) if static else None
    q, scale = quantize_per_token_triton(x, static_scale)
    want_q, want_scale = quantize_per_token_ref(x, static_scale)
    assert q.dtype == FP8_DTYPE and scale.shape == (m, 1) and scale.dtype == torch.float32
    torch.testing.assert_close(scale, want_scale, atol=0, rtol=0)
    torch.testing.assert_close(q.float(), want_q.float(), atol=0, rtol=0)
    if not static or m > 1:  # the largest row reaches the top level (or, static, saturates)
        assert q.float().abs().max() == 448
    assert not q.float().isnan().any() and (m == 1 or (q[0].float() == 0).all())


def test_per_token_quantization_dispatch(device, triton_path):
    """quantize_per_token takes the kernel for contiguous rows and the reference for strided ones, with one
    answer."""
    x = _quantization_inputs(4, 300, torch.bfloat16, device)
    strided = torch.cat([x, x], dim=1)[:, ::2]
    for rows in (x, strided):
        q, scale = quantize_per_token(rows)
        want_q, want_scale = quantize_per_token_ref(rows)
        torch.testing.assert_close(q.float(), want_q.float(), atol=0, rtol=0)
        torch.testing.assert_close(scale, want_scale, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("m, k", [(1, 4096), (300, 14336), (2048, 4096)])
def test_per_token_quantization_gpu(m, k, cuda):
    """The kernel on the device against the torch ops: equal scales; levels one e4m3 step apart at most, in a
    few elements (the kernel's float32 division may round the other way at a tie)."""
    torch.manual_seed(k)
    x = _quantization_inputs(m, k, torch.bfloat16, cuda)
    q, scale = quantize_per_token_triton(x)
    want_q, want_scale = quantize_per_token_ref(x)
    torch.testing.assert_close(scale, want_scale, atol=0, rtol=0)
    differ = q.float() != want_q.float()
    assert differ.float().mean() < 1e-3
    step = want_q.float().abs().clamp_min(2 ** -6) * 2 ** -3  # one e4m3 step: 3 mantissa bits
    assert ((q.float() - want_q.float()).abs() <= step * 1.01)[differ].all()
