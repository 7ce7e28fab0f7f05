"""A weight in tinygemm's layout dequantized to bf16 by the Triton kernel (on CPU in the interpreter): to the bit
the weights tinygemm_weight_ref says the kernel multiplies, for inner k-tiles 8, 4 and 2, groups 32..256, shapes
that leave partial tiles; slices of rows; the matmul in slices of rows equal to the one-piece reference. On a GPU:
the compiled kernel to the bit, and against torch's tinygemm itself (its product with the identity is its weight)."""

import pytest
import torch
from kernel_helpers import random_int4_weight, tolerance

from scaleinfer.kernels import dequant_int4_tinygemm
from scaleinfer.kernels.dequant_int4_tinygemm import (
    chunk_rows,
    dequant_tinygemm_mm,
    dequantize_tinygemm,
    weight_shape,
)
from scaleinfer.kernels.int4_tinygemm import (
    inner_k_tiles,
    pack_tinygemm,
    tinygemm_mm,
    tinygemm_mm_ref,
    tinygemm_weight_ref,
)


def _tinygemm_weight(n, k, group, seed, device="cpu"):
    """Random levels, scales and zeros (outputs of x ~ N(0, 1) about 1) in tinygemm's layout."""
    return pack_tinygemm(*random_int4_weight(n, k, group, seed, device))


# (N, K, group, inner k-tiles): N past the interpreter's 16-row tiles, K past its 128-feature ones, or neither
SHAPES = [(8, 32, 32, 2), (24, 96, 32, 2), (16, 160, 32, 2), (40, 576, 64, 4), (48, 192, 64, 4),
          (24, 256, 128, 8), (200, 384, 128, 8), (64, 256, 256, 8), (16, 512, 256, 8)]


@pytest.mark.parametrize("n,k,group,t", SHAPES)
def test_dequantized_weight_is_tinygemms_to_the_bit(n, k, group, t, triton_path):
    weight = _tinygemm_weight(n, k, group, seed=n * k + group)
    assert inner_k_tiles(k) == t and weight_shape(weight) == (n, k)
    got = dequantize_tinygemm(weight)
    assert got.shape == (n, k) and got.dtype == torch.bfloat16
    assert torch.equal(got, tinygemm_weight_ref(weight))


def test_a_slice_of_rows_into_a_given_buffer(triton_path):
    weight = _tinygemm_weight(64, 576, 64, seed=3)
    out = torch.full((32, 576), float("nan"), dtype=torch.bfloat16)
    assert dequantize_tinygemm(weight, 24, 24, out[:24]).data_ptr() == out.data_ptr()
    assert torch.equal(out[:24], tinygemm_weight_ref(weight)[24:48]) and out[24:].isnan().all()


@pytest.mark.parametrize("m", [1, 17, 40])
def test_the_matmul_in_slices_of_rows_equals_the_reference(m, triton_path, monkeypatch):
    """A temporary bound of 16 rows: slices at rows 0, 16, 32 of 40 (the last one partial), each written into its
    columns of one output."""
    monkeypatch.setattr(dequant_int4_tinygemm, "DEQUANT_CHUNK_BYTES", 16 * 2 * 192)
    monkeypatch.setattr(dequant_int4_tinygemm, "CHUNK_ROW_MULTIPLE", 8)
    calls, dequantize = [], dequant_int4_tinygemm.dequantize_tinygemm
    monkeypatch.setattr(dequant_int4_tinygemm, "dequantize_tinygemm",
                        lambda w, *args: calls.append(args[:2]) or dequantize(w, *args))
    weight = _tinygemm_weight(40, 192, 64, seed=m)
    x = torch.randn(m, 192, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    bias = torch.randn(40).to(torch.bfloat16)
    got = dequant_tinygemm_mm(x, weight, bias)
    assert calls == [(0, 16), (16, 16), (32, 8)] and got.shape == (m, 40) and got.dtype == torch.bfloat16
    expected = (tinygemm_mm_ref(x, weight).float() + bias.float()).to(torch.bfloat16)
    torch.testing.assert_close(got, expected, **tolerance(torch.bfloat16))


def test_float32_activations_come_back_float32(triton_path):
    weight = _tinygemm_weight(16, 64, 32, seed=5)
    x = torch.randn(3, 64)
    got = dequant_tinygemm_mm(x, weight)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, tinygemm_mm_ref(x.to(torch.bfloat16), weight).float(), **tolerance(torch.bfloat16))


def test_the_temporary_is_bounded_by_the_chunk_bytes():
    """Llama 3 8B's linears dequantize in one piece (gate_up: 235 MB); a 128256 x 4096 head in slices of 32768
    rows (256 MiB); slices are whole 128-row tiles."""
    assert chunk_rows(28672, 4096) >= 28672 and chunk_rows(4096, 14336) >= 4096
    assert chunk_rows(128256, 4096) == 32768 and dequant_int4_tinygemm.DEQUANT_CHUNK_BYTES >= 2 * 32768 * 4096
    assert chunk_rows(1024, 53248) % 128 == 0 and 2 * chunk_rows(1024, 53248) * 53248 <= 256 << 20


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,group", [(4096, 4096, 128), (1024, 14336, 128), (200, 576, 64), (264, 96, 32),
                                       (512, 4096, 256)])
def test_compiled_kernel_is_tinygemms_to_the_bit(n, k, group, cuda):
    weight = _tinygemm_weight(n, k, group, seed=n + k, device=cuda)
    assert torch.equal(dequantize_tinygemm(weight), tinygemm_weight_ref(weight))
    assert torch.equal(dequantize_tinygemm(weight, 64, 128), tinygemm_weight_ref(weight)[64:192])


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,group", [(256, 4096, 128), (200, 576, 64), (64, 96, 32)])
def test_the_weights_are_those_torchs_tinygemm_multiplies(n, k, group, cuda):
    """tinygemm's product with the identity is its weight, transposed, in bf16 (each output one product, exactly
    summed). Its fma rounds once where the reference rounds the float32 sum again: a value can differ by one
    bf16 step where the zero is below float32's resolution of the product (none in practice)."""
    if torch.cuda.get_device_capability(cuda) < (8, 0):
        pytest.skip("tinygemm needs sm80+")
    weight = _tinygemm_weight(n, k, group, seed=k, device=cuda)
    eye = torch.eye(k, dtype=torch.bfloat16, device=cuda)
    torch_weight = tinygemm_mm(eye, weight).T
    ours = dequantize_tinygemm(weight)
    torch.testing.assert_close(ours, torch_weight, atol=0, rtol=2**-7)
    assert (ours != torch_weight).float().mean().item() < 1e-4
