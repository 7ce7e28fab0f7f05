"""torch's int4 tinygemm on our format: the layout's reference packing against a hand-placed word and its inverse,
the reference matmul against int4_linear_ref; on a GPU, torch's own packing (aten._convert_weight_to_int4pack)
equals the reference packing, and aten._weight_int4pack_mm equals int4_linear_ref at several rows and groups."""

import pytest
import torch
from kernel_helpers import random_int4_weight, tolerance

from scaleinfer.kernels.gemv_int4 import int4_linear_ref, pack_int4
from scaleinfer.kernels.int4_tinygemm import (
    from_tinygemm_layout,
    inner_k_tiles,
    pack_tinygemm,
    tinygemm_layout_ref,
    tinygemm_mm,
    tinygemm_takes,
)


def _swap_nibbles(packed):
    return (packed << 4) | (packed >> 4)


@pytest.mark.parametrize("n,k,t", [(8, 32, 2), (16, 128, 4), (24, 256, 8), (40, 384, 8)])
def test_reference_layout_inverts_exactly(n, k, t):
    packed, _, _ = random_int4_weight(n, k, 32, seed=n + k)
    layout = tinygemm_layout_ref(packed, t)
    assert layout.shape == (n // 8, k // (16 * t), 32, t // 2) and layout.dtype == torch.int32
    assert torch.equal(from_tinygemm_layout(layout), packed)


def test_a_word_holds_a_lanes_even_features_low_and_odd_features_high():
    """int4mm.cu: lane l of an 8-row tile reads row l // 4, bytes l % 4 + (0, 4, 8, 12) of the k-tile pair; the
    word's nibble i is byte i's even feature, nibble 4 + i its odd one."""
    levels = torch.arange(8 * 32).remainder(16).to(torch.uint8).view(8, 32)
    levels[5, 2 * 5 + 1] = 9  # row 5 is lane 21's (and 20, 22, 23's); byte 5 is its second: nibble 4 + 1
    word = int(tinygemm_layout_ref(pack_int4(levels), 2)[0, 0, 21, 0]) & 0xFFFFFFFF
    nibbles = [(word >> (4 * i)) & 0xF for i in range(8)]
    byte_columns = [1, 5, 9, 13]  # 21 % 4 = 1
    assert nibbles[:4] == [int(levels[5, 2 * c]) for c in byte_columns]
    assert nibbles[4:] == [int(levels[5, 2 * c + 1]) for c in byte_columns]
    assert nibbles[5] == 9


def test_inner_k_tiles_is_the_largest_that_divides_k():
    assert (inner_k_tiles(4096), inner_k_tiles(14336), inner_k_tiles(576), inner_k_tiles(96)) == (8, 8, 4, 2)


@pytest.mark.parametrize("m,k,group", [(1, 256, 32), (3, 192, 64), (16, 512, 128), (5, 512, 256)])
def test_reference_matmul_equals_the_format(m, k, group):
    """Off the GPU tinygemm_mm runs the kernel's arithmetic in torch (bf16 weights and scales): bf16-close to the
    float32 reference, and far from it when the nibbles of each byte are read the other way."""
    packed, scale, zero = random_int4_weight(48, k, group, seed=m + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    got = tinygemm_mm(x, pack_tinygemm(packed, scale, zero))
    assert got.shape == (m, 48) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, int4_linear_ref(x, packed, scale, zero), **tolerance(torch.bfloat16))
    swapped = tinygemm_mm(x, pack_tinygemm(_swap_nibbles(packed), scale, zero))
    assert not torch.allclose(swapped.float(), got.float(), atol=5e-2)


def test_tinygemm_does_not_take_cpu_tensors():
    assert not tinygemm_takes(4096, 4096, 128, torch.device("cpu"), torch.bfloat16)


@pytest.mark.gpu
def test_tinygemm_takes_bf16_and_the_kernels_shapes(cuda):
    if torch.cuda.get_device_capability(cuda) < (8, 0):
        pytest.skip("tinygemm needs sm80+")
    assert tinygemm_takes(6144, 4096, 128, cuda, torch.bfloat16) and tinygemm_takes(4096, 14336, 128, cuda,
                                                                                    torch.bfloat16)
    assert tinygemm_takes(1536, 576, 64, cuda, torch.bfloat16) and tinygemm_takes(64, 32, 32, cuda, torch.bfloat16)
    assert not tinygemm_takes(4096, 4096, 128, cuda, torch.float16)  # bf16 only
    assert not tinygemm_takes(1001, 4096, 128, cuda, torch.bfloat16)  # N % 8
    assert not tinygemm_takes(4096, 4096, 512, cuda, torch.bfloat16)  # group sizes 32..256


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(64, 32), (48, 576), (256, 4096), (128, 14336)])
def test_torch_packing_equals_the_reference_layout(n, k, cuda):
    """Our reading of int4mm.cu (nibble order of the uint8 input, lanes, k-tile pairs) against torch's own."""
    packed, _, _ = random_int4_weight(n, k, 32, seed=n * k, device=cuda)
    t = inner_k_tiles(k)
    torch_layout = torch.ops.aten._convert_weight_to_int4pack(_swap_nibbles(packed).contiguous(), t)
    assert torch.equal(torch_layout, tinygemm_layout_ref(packed, t))
    scale = zero = torch.ones(n, k // 32, device=cuda)
    assert torch.equal(pack_tinygemm(packed, scale, zero).packed, torch_layout)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 16, 100])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 14336), (200, 576)])
def test_torch_tinygemm_equals_the_reference(m, group, n, k, cuda):
    if k % group:
        pytest.skip("the group does not divide K")
    packed, scale, zero = random_int4_weight(n, k, group, seed=m + group + n, device=cuda)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(device=cuda, dtype=torch.bfloat16)
    bias = torch.randn(n, device=cuda, dtype=torch.bfloat16)
    got = tinygemm_mm(x, pack_tinygemm(packed, scale, zero), bias)
    torch.testing.assert_close(got, int4_linear_ref(x, packed, scale, zero, bias), **tolerance(torch.bfloat16))
