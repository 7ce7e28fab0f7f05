"""The group-wise int4 GEMV against its torch reference on fresh random inputs (ragged N, K of several groups,
bias, bf16, several rows), the packing, and on a GPU: Llama-3-8B shapes and the kernel inside a CUDA graph."""

import pytest
import torch
from kernel_helpers import tolerance

from scaleinfer.kernels.gemm_int4 import int4_gemm_triton
from scaleinfer.kernels.gemv import GemvConfig
from scaleinfer.kernels.gemv_int4 import (
    dequantize_int4,
    int4_gemv,
    int4_gemv_triton,
    int4_linear_ref,
    pack_int4,
    unpack_int4,
)


def _inputs(m, n, k, group, dtype, device, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype=dtype, device=device)
    levels = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, k // group, generator=g) + 0.5) / (8 * k**0.5)
    zero = torch.randn(n, k // group, generator=g) / (8 * k**0.5)
    b = torch.randn(n, generator=g).to(dtype=dtype, device=device) if bias else None
    return x, pack_int4(levels).to(device), scale.to(device), zero.to(device), b


def test_packing_round_trips_and_dequantizes_per_group():
    levels = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_int4(levels)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), levels)
    assert torch.equal(packed[:, 0] & 0xF, levels[:, 0]) and torch.equal(packed[:, 0] >> 4, levels[:, 1])
    scale, zero = torch.rand(5, 2), torch.randn(5, 2)
    w = dequantize_int4(packed, scale, zero)
    torch.testing.assert_close(w[:, 40], (levels[:, 40].float() - 8) * scale[:, 1] + zero[:, 1])


@pytest.mark.parametrize("m,n,k,group,dtype,bias", [(1, 37, 320, 32, torch.float32, False),
                                                    (3, 64, 512, 128, torch.float32, True),
                                                    (1, 50, 576, 64, torch.bfloat16, True),
                                                    (4, 16, 96, 32, torch.bfloat16, False)])
def test_int4_gemv_matches_reference(m, n, k, group, dtype, bias, device, triton_path):
    x, packed, scale, zero, b = _inputs(m, n, k, group, dtype, device, bias, seed=m * 7 + n * 1000 + k)
    got = int4_gemv(x, packed, scale, zero, b, GemvConfig(block_n=16, block_k=128))
    assert got.shape == (m, n) and got.dtype == dtype
    torch.testing.assert_close(got, int4_linear_ref(x, packed, scale, zero, b), **tolerance(dtype))


@pytest.mark.parametrize("m,n,k,group,dtype,bias", [(5, 37, 320, 32, torch.float32, True),
                                                    (33, 64, 512, 128, torch.bfloat16, False),
                                                    (17, 50, 192, 64, torch.bfloat16, True)])
def test_int4_gemm_past_the_gemv_matches_reference(m, n, k, group, dtype, bias, device, triton_path):
    x, packed, scale, zero, b = _inputs(m, n, k, group, dtype, device, bias, seed=m + n + k)
    got = int4_gemm_triton(x, packed, scale, zero, b)
    assert got.shape == (m, n) and got.dtype == dtype
    torch.testing.assert_close(got, int4_linear_ref(x, packed, scale, zero, b), **tolerance(dtype))
    swapped = torch.stack([packed >> 4, packed & 0xF], dim=-1).flatten(1).reshape(n, k // 2, 2)
    swapped = (swapped[..., 0] | (swapped[..., 1] << 4)).to(torch.uint8)  # nibbles of each byte swapped
    assert not torch.allclose(got.float(), int4_linear_ref(x, swapped, scale, zero, b).float(), atol=1e-2)


def test_bad_arguments_are_named(device, triton_path):
    x, packed, scale, zero, _ = _inputs(1, 4, 64, 32, torch.float32, device, False, seed=0)
    with pytest.raises(ValueError, match="packed has shape"):
        int4_gemv_triton(x, packed[:, :31], scale, zero, None)
    with pytest.raises(ValueError, match="packed has dtype"):
        int4_gemv_triton(x, packed.to(torch.int8), scale, zero, None)
    with pytest.raises(ValueError, match="scale has dtype"):
        int4_gemv_triton(x, packed, scale.half(), zero, None)
    with pytest.raises(ValueError, match="zero has shape"):
        int4_gemv_triton(x, packed, scale, zero[:, :1], None)
    with pytest.raises(ValueError, match="do not split K=64"):
        int4_gemv_triton(x, packed, torch.ones(4, 3, device=device), torch.ones(4, 3, device=device), None)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 6144, 4096), (1, 4096, 4096), (1, 28672, 4096), (1, 4096, 14336),
                                   (4, 4096, 14336), (2, 1001, 576)])
def test_int4_gemv_llama3_8b_and_odd_shapes_on_gpu(m, n, k, cuda):
    group = 128 if k % 128 == 0 else 64
    x, packed, scale, zero, _ = _inputs(m, n, k, group, torch.bfloat16, cuda, False, seed=n + k)
    torch.testing.assert_close(int4_gemv(x, packed, scale, zero), int4_linear_ref(x, packed, scale, zero),
                               **tolerance(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3])
def test_int4_gemv_inside_a_cuda_graph(m, cuda):
    """Captured once, replayed on new inputs copied into the captured buffer: the reference of those inputs."""
    x, packed, scale, zero, b = _inputs(m, 4096, 4096, 128, torch.bfloat16, cuda, True, seed=m)
    int4_gemv(x, packed, scale, zero, b)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = int4_gemv(x, packed, scale, zero, b)
    for seed in range(2):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 10)).to(x))
        graph.replay()
        torch.testing.assert_close(out, int4_linear_ref(x, packed, scale, zero, b), **tolerance(torch.bfloat16))
