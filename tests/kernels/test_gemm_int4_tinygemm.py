"""The GEMM that reads tinygemm's layout and dequantizes in registers (on CPU in the interpreter) against the torch
reference x @ tinygemm_weight_ref(w).T on fresh random inputs: odd rows, bias or none, groups 32..256, N past a
tile, both reads of the layout, split along K; float32 activations come back float32; bad arguments are named. On
a GPU: Llama-3-8B shapes, the tile configs the bench sweeps, and the kernel inside a CUDA graph."""

import pytest
import torch
from kernel_helpers import random_int4_weight, tolerance

from scaleinfer.kernels.gemm_int4_tinygemm import (
    INTERPRETER_TILES,
    INTERPRETER_VALUE_TILES,
    GemmTiles,
    tinygemm_gemm,
    tinygemm_gemm_triton,
)
from scaleinfer.kernels.int4_tinygemm import TinygemmWeight, pack_tinygemm, tinygemm_weight_ref

BF16 = tolerance(torch.bfloat16)


def _inputs(m, n, k, group, seed, device, bias):
    weight = pack_tinygemm(*random_int4_weight(n, k, group, seed, device))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to(dtype=torch.bfloat16, device=device)
    b = torch.randn(n, generator=g).to(dtype=torch.bfloat16, device=device) if bias else None
    return x, weight, b


def _ref(x, weight, bias=None):
    """The products of x with tinygemm's own bf16 weights summed in float32, bias in the sums, bf16 out."""
    y = x.float() @ tinygemm_weight_ref(weight).float().T
    return (y if bias is None else y + bias.float()).to(torch.bfloat16)


# (M, N, K, group): odd M across one and several m-tiles, N past the interpreter's 16-feature tiles and not a
# multiple of them, every group size tinygemm takes (BLOCK_K = the group where it is below 64)
CASES = [(17, 64, 256, 32, True), (33, 24, 256, 64, False), (100, 40, 256, 128, True), (17, 64, 512, 256, False),
         (5, 16, 128, 32, True)]


@pytest.mark.parametrize("tiles", [INTERPRETER_TILES, INTERPRETER_VALUE_TILES], ids=["words", "values"])
@pytest.mark.parametrize("m,n,k,group,bias", CASES)
def test_equals_the_reference_of_tinygemms_weights(m, n, k, group, bias, tiles, device, triton_path):
    x, weight, b = _inputs(m, n, k, group, seed=m * n + group, device=device, bias=bias)
    got = tinygemm_gemm(x, weight, b, tiles)
    assert got.shape == (m, n) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, _ref(x, weight, b), **BF16)


@pytest.mark.parametrize("k,group,t", [(512, 256, 8), (192, 64, 4), (96, 32, 2)])
def test_word_tiles_across_k_tiles_and_inner_k_tiles(k, group, t, device, triton_path):
    """Words read once with BLOCK_K past one k-outer step of the layout (16 t features) and at each inner k-tiles."""
    x, weight, b = _inputs(19, 24, k, group, seed=k + t, device=device, bias=True)
    assert 2 * weight.packed.shape[3] == t
    got = tinygemm_gemm(x, weight, b, GemmTiles(32, 16, 256, 1, 1, words=True))
    torch.testing.assert_close(got, _ref(x, weight, b), **BF16)


@pytest.mark.parametrize("split_k,words", [(2, True), (4, True), (3, False), (64, True)])
def test_split_k_partial_sums_add_to_the_reference(split_k, words, device, triton_path):
    """K = 384 in 6 steps of 64: 2 splits of 3 steps, 3 of 2 (split_k 4 and 3), 6 of 1 (split_k past the steps);
    bias once, after the sum."""
    x, weight, b = _inputs(21, 40, 384, 64, seed=split_k, device=device, bias=True)
    got = tinygemm_gemm(x, weight, b, GemmTiles(32, 16, 64, 1, 1, words=words, split_k=split_k))
    assert got.shape == (21, 40) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, _ref(x, weight, b), **BF16)


def test_misplaced_scales_fail_the_comparison(device, triton_path):
    """The reference is sharp enough to see a wrong reading: the same levels with the groups' scales swapped."""
    x, weight, _ = _inputs(17, 32, 256, 64, seed=4, device=device, bias=False)
    rolled = TinygemmWeight(weight.packed, weight.scale_zero.roll(1, dims=0).contiguous(), weight.group_size)
    assert not torch.allclose(tinygemm_gemm(x, rolled).float(), _ref(x, weight).float(), **BF16)


def test_float32_activations_come_back_float32(device, triton_path):
    x, weight, b = _inputs(20, 16, 128, 32, seed=9, device=device, bias=True)
    got = tinygemm_gemm(x.float(), weight, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _ref(x, weight, b).float(), **BF16)


def test_bad_arguments_are_named(device, triton_path):
    x, weight, _ = _inputs(17, 16, 128, 32, seed=0, device=device, bias=False)
    with pytest.raises(ValueError, match="x has shape"):
        tinygemm_gemm_triton(x[:, :64].contiguous(), weight)
    with pytest.raises(ValueError, match="x has dtype"):
        tinygemm_gemm_triton(x.float(), weight)
    with pytest.raises(ValueError, match="scale_zero has shape"):
        tinygemm_gemm_triton(x, TinygemmWeight(weight.packed, weight.scale_zero[:2].contiguous(), 32))
    with pytest.raises(ValueError, match="not a multiple of 32"):
        tinygemm_gemm_triton(x, weight, None, GemmTiles(16, 16, 16, 1, 1, words=True))
    with pytest.raises(ValueError, match="bias has shape"):
        tinygemm_gemm_triton(x, weight, torch.zeros(8, dtype=torch.bfloat16, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [17, 64, 255, 512])
@pytest.mark.parametrize("n,k,group", [(6144, 4096, 128), (28672, 4096, 128), (4096, 14336, 128), (200, 576, 64),
                                       (264, 96, 32), (512, 4096, 256)])
def test_llama3_8b_and_odd_shapes_on_gpu(m, n, k, group, cuda):
    x, weight, b = _inputs(m, n, k, group, seed=m + n + k, device=cuda, bias=True)
    torch.testing.assert_close(tinygemm_gemm(x, weight, b), _ref(x, weight, b), **BF16)


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [GemmTiles(16, 64, 128, 4, 3), GemmTiles(64, 128, 64, 4, 4),
                                   GemmTiles(128, 64, 128, 8, 3), GemmTiles(32, 32, 256, 4, 2),
                                   GemmTiles(64, 64, 128, 4, 3, words=True), GemmTiles(128, 128, 64, 8, 3, True),
                                   GemmTiles(64, 32, 128, 4, 3, True, split_k=4)],
                         ids=lambda tiles: tiles.name())
def test_tile_configs_on_gpu(tiles, cuda):
    x, weight, b = _inputs(100, 4096, 4096, 128, seed=3, device=cuda, bias=True)
    torch.testing.assert_close(tinygemm_gemm_triton(x, weight, b, tiles), _ref(x, weight, b), **BF16)


@pytest.mark.gpu
@pytest.mark.parametrize("m,split_k", [(17, 1), (64, 1), (200, 1), (33, 4)])
def test_inside_a_cuda_graph(m, split_k, cuda):
    """Captured once, replayed on new inputs copied into the captured buffer: the reference of those inputs (split
    along K too: its partial sums and their sum from the graph's pool)."""
    x, weight, b = _inputs(m, 4096, 4096, 128, seed=m, device=cuda, bias=True)
    tiles = GemmTiles(64, 32, 128, 4, 3, words=True, split_k=split_k)
    tinygemm_gemm(x, weight, b, tiles)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tinygemm_gemm(x, weight, b, tiles)
    for seed in range(2):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 10)).to(x))
        graph.replay()
        torch.testing.assert_close(out, _ref(x, weight, b), **BF16)
