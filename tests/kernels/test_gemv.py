"""The batch-1 GEMV kernel against F.linear, on fresh random inputs (ragged N and K, bias, bf16)."""

import pytest
import torch
from kernel_helpers import tolerance

from scaleinfer.kernels.gemv import GemvConfig, gemv, gemv_ref, gemv_triton


@pytest.mark.parametrize("n,k,dtype,bias", [(37, 300, torch.float32, False), (64, 512, torch.float32, True),
                                            (50, 1030, torch.bfloat16, True), (16, 64, torch.bfloat16, False)])
def test_gemv_matches_linear(n, k, dtype, bias, device, triton_path):
    torch.manual_seed(n * 1000 + k)
    x = torch.randn(1, k, dtype=dtype, device=device)
    weight = torch.randn(n, k, dtype=dtype, device=device) / k**0.5
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    got = gemv(x, weight, b, GemvConfig(block_n=16, block_k=128))
    assert got.shape == (1, n) and got.dtype == dtype
    torch.testing.assert_close(got, gemv_ref(x, weight, b), **tolerance(dtype))


def test_bad_arguments_are_named(device, triton_path):
    x, weight = torch.randn(2, 8, device=device), torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="x has shape"):
        gemv_triton(x, weight, None, GemvConfig())
    with pytest.raises(ValueError, match="weight has shape"):
        gemv_triton(x[:1], torch.randn(4, 9, device=device), None, GemvConfig())
    with pytest.raises(ValueError, match="weight has dtype"):
        gemv_triton(x[:1], weight.double(), None, GemvConfig())


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
def test_gemv_llama3_8b_shapes_on_gpu(n, k, cuda):
    torch.manual_seed(n + k)
    x = torch.randn(1, k, dtype=torch.bfloat16, device=cuda)
    weight = torch.randn(n, k, dtype=torch.bfloat16, device=cuda) / k**0.5
    torch.testing.assert_close(gemv(x, weight), gemv_ref(x, weight), **tolerance(torch.bfloat16))


def test_linear_takes_the_gemv_for_one_row_where_it_is_faster(device, triton_path, monkeypatch):
    from scaleinfer.kernels import gemv as module

    calls = []
    original = module.gemv_triton
    monkeypatch.setattr(module, "gemv_triton", lambda *args: calls.append(args[3]) or original(*args))
    torch.manual_seed(0)
    narrow = torch.randn(32, 64, device=device)  # out <= in: a GEMV (o_proj, down_proj)
    between = torch.randn(96, 64, device=device)  # in < out < WIDE_FEATURES: cuBLAS (qkv_proj)
    x = torch.randn(1, 64, device=device)
    torch.testing.assert_close(module.linear(x, narrow), gemv_ref(x, narrow), **tolerance(torch.float32))
    assert calls == [module.NARROW]
    for skipped in [(x, between), (torch.randn(2, 64, device=device), narrow),  # the others go to F.linear
                    (torch.randn(64, 2, device=device).t()[:1], narrow)]:  # not contiguous
        torch.testing.assert_close(module.linear(*skipped), gemv_ref(*skipped))
    assert len(calls) == 1
    assert module.decode_config(128256, 4096) is module.WIDE and module.decode_config(28672, 4096) is module.WIDE


def test_decode_config_follows_the_card():
    from scaleinfer.kernels import gemv as module

    h100, h200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    assert module.decode_config(4096, 14336, h100) is module.NARROW
    assert module.decode_config(28672, 4096, h100) is module.WIDE
    assert module.decode_config(4096, 4096, h200) is module.NARROW  # o_proj
    assert [module.decode_config(n, k, h200) for n, k in [(6144, 4096), (28672, 4096), (4096, 14336),
                                                           (128256, 4096)]] == [None] * 4
