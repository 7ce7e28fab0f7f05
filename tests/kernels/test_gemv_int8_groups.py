"""The group-wise int8 GEMV (GGUF Q8_0's format) against its torch reference, on fresh random inputs (ragged N,
K of whole groups not a multiple of the step, bias, bf16, several rows, groups of 32 and 64), and against gguf's
own Q8_0 dequantization; the weight-only GEMM past the GEMV's rows with the same scales."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from kernel_helpers import tolerance

from scaleinfer.kernels.gemm_weight_only import int8_groups_gemm_triton
from scaleinfer.kernels.gemv import GemvConfig
from scaleinfer.kernels.gemv_int8_groups import (
    dequantize_int8_groups,
    int8_groups_gemv,
    int8_groups_gemv_triton,
    int8_groups_linear_ref,
)
from scaleinfer.weights.gguf_quant import read_q8_0


def _inputs(m, n, k, group, dtype, device, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype=dtype, device=device)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(device)
    scale = ((torch.rand(n, k // group, generator=g) + 0.5) / (64 * k**0.5)).to(device)  # outputs about 1
    b = torch.randn(n, generator=g).to(dtype=dtype, device=device) if bias else None
    return x, q, scale, b


@pytest.mark.parametrize("m,n,k,group,dtype,bias", [(1, 37, 96, 32, torch.float32, False),
                                                    (3, 64, 512, 32, torch.float32, True),
                                                    (1, 50, 1088, 32, torch.bfloat16, True),
                                                    (4, 16, 384, 64, torch.bfloat16, False)])
@pytest.mark.parametrize("block_k", [64, 256])
def test_int8_groups_gemv_matches_reference(m, n, k, group, dtype, bias, block_k, device, triton_path):
    x, q, scale, b = _inputs(m, n, k, group, dtype, device, bias, seed=m * 7 + n * 1000 + k)
    got = int8_groups_gemv(x, q, scale, b, GemvConfig(block_n=8, block_k=block_k))
    assert got.shape == (m, n) and got.dtype == dtype
    torch.testing.assert_close(got, int8_groups_linear_ref(x, q, scale, b), **tolerance(dtype))


@pytest.mark.parametrize("m,n,k,group,dtype,bias", [(5, 37, 96, 32, torch.float32, True),
                                                    (33, 64, 512, 32, torch.bfloat16, False),
                                                    (17, 50, 384, 64, torch.bfloat16, True)])
def test_int8_groups_gemm_past_the_gemv_matches_reference(m, n, k, group, dtype, bias, device, triton_path):
    x, q, scale, b = _inputs(m, n, k, group, dtype, device, bias, seed=m + n + k)
    got = int8_groups_gemm_triton(x, q, scale, b)
    assert got.shape == (m, n) and got.dtype == dtype
    torch.testing.assert_close(got, int8_groups_linear_ref(x, q, scale, b), **tolerance(dtype))
    shuffled = scale[:, torch.randperm(scale.shape[1], generator=torch.Generator().manual_seed(0))]
    assert not torch.allclose(int8_groups_gemm_triton(x, q, shuffled, b), got, **tolerance(dtype))


def test_each_group_takes_its_own_scale(device, triton_path):
    """One row, one nonzero group at a time: a kernel that applies a neighbour's scale gives another output."""
    x, q, _, _ = _inputs(1, 8, 256, 32, torch.float32, device, False, seed=3)
    scale = torch.arange(1, 8 * 8 + 1, dtype=torch.float32, device=device).view(8, 8) / 1000
    got = int8_groups_gemv(x, q, scale, None, GemvConfig(block_n=4, block_k=64))
    torch.testing.assert_close(got, int8_groups_linear_ref(x, q, scale), **tolerance(torch.float32))


def test_q8_0_blocks_are_ggufs_dequantized_values_exactly():
    rows = np.random.default_rng(0).standard_normal((5, 96)).astype(np.float32)
    data = quantize(rows, GGMLQuantizationType.Q8_0)

    class Tensor:  # what read_q8_0 reads of a ReaderTensor
        tensor_type, shape = GGMLQuantizationType.Q8_0, np.array([96, 5])

    Tensor.data = data
    blocks = read_q8_0(Tensor)
    assert blocks.levels.dtype == np.int8 and blocks.levels.shape == (5, 96) and blocks.scale.shape == (5, 3)
    got = dequantize_int8_groups(torch.from_numpy(blocks.levels), torch.from_numpy(blocks.scale))
    np.testing.assert_array_equal(got.numpy(), dequantize(data, GGMLQuantizationType.Q8_0))


def test_bad_arguments_are_named(device, triton_path):
    x, q, scale, _ = _inputs(1, 4, 64, 32, torch.float32, device, False, seed=0)
    with pytest.raises(ValueError, match="q has shape"):
        int8_groups_gemv_triton(x, q[:, :32], scale, None)
    with pytest.raises(ValueError, match="q has dtype"):
        int8_groups_gemv_triton(x, q.float(), scale, None)
    with pytest.raises(ValueError, match="scale has dtype"):
        int8_groups_gemv_triton(x, q, scale.half(), None)
    with pytest.raises(ValueError, match="do not split K=64"):
        int8_groups_gemv_triton(x, q, torch.ones(4, 3, device=device), None)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 6144, 4096), (1, 28672, 4096), (1, 4096, 14336), (4, 4096, 14336)])
def test_int8_groups_gemv_llama3_8b_shapes_on_gpu(m, n, k):
    x, q, scale, _ = _inputs(m, n, k, 32, torch.bfloat16, torch.device("cuda"), False, seed=k)
    torch.testing.assert_close(int8_groups_gemv_triton(x, q, scale, None), int8_groups_linear_ref(x, q, scale),
                               **tolerance(torch.bfloat16))
