"""Varlen prefill attention over the paged cache against paged_prefill_attention, chunk by chunk."""

import pytest
import torch
from kernel_helpers import paged_kv, tolerance

from scaleinfer.kernels.paged_attention import paged_prefill_attention_varlen
from scaleinfer.kernels.prefill_attention import prefill_attention, prefill_attention_triton

CASES = [  # (chunks as (start_pos, num_query), num_heads, num_kv_heads, head_dim, block_size, block_m, dtype)
    ([(0, 9)], 4, 4, 64, 16, None, torch.float32),
    ([(0, 9), (8, 5), (3, 1), (13, 20)], 8, 2, 64, 4, 16, torch.float32),  # GQA 4: 4 tokens per program
    ([(0, 1), (40, 7)], 4, 1, 128, 8, 32, torch.float32),
    ([(5, 12), (0, 17)], 8, 2, 64, 16, 16, torch.bfloat16),
    ([(30, 3), (0, 24)], 4, 4, 128, 16, None, torch.bfloat16),
]


def varlen_inputs(chunks, num_heads, num_kv_heads, head_dim, block_size, dtype, device, extra_blocks=2):
    kv = paged_kv([s + n for s, n in chunks], num_kv_heads, head_dim, block_size, dtype, device, extra_blocks)
    num_query = [n for _, n in chunks]
    q = torch.randn(sum(num_query), num_heads, head_dim, dtype=dtype, device=device)
    query_start_loc = torch.tensor([0, *num_query], device=device).cumsum(0).int()
    start_pos = torch.tensor([s for s, _ in chunks], device=device, dtype=torch.int32)
    return kv, q, query_start_loc, start_pos


@pytest.mark.parametrize("case", range(len(CASES)))
def test_prefill_attention_matches_reference(case, device, triton_path):
    chunks, num_heads, num_kv_heads, head_dim, block_size, block_m, dtype = CASES[case]
    torch.manual_seed(400 + case)
    kv, q, query_start_loc, start_pos = varlen_inputs(chunks, num_heads, num_kv_heads, head_dim, block_size,
                                                      dtype, device)
    out = torch.full_like(q, float("nan"))  # every row must be written
    scale = head_dim**-0.5
    got = prefill_attention_triton(q, kv.k_cache, kv.v_cache, kv.block_tables, query_start_loc, start_pos, scale,
                                   max(n for _, n in chunks), out=out, block_m=block_m)
    expected = paged_prefill_attention_varlen(q, *kv.clean(), kv.block_tables, query_start_loc, start_pos, scale)
    assert got is out
    torch.testing.assert_close(got, expected, **tolerance(dtype))


FEATURE_CASES = [  # (chunks, num_heads, num_kv_heads, block_size, block_m, window, softcap, scale, dtype)
    ([(0, 40), (30, 25), (5, 3)], 8, 2, 4, 16, 8, None, 0.3, torch.float32),  # 4 tokens per program
    ([(0, 40), (30, 25)], 4, 4, 16, 16, 20, None, 0.25, torch.float32),  # 16 tokens per program > window 8
    ([(0, 33), (17, 30)], 4, 4, 8, 32, 5, 3.0, 0.4, torch.float32),
    ([(0, 24), (12, 12)], 4, 2, 16, 16, None, 4.0, 0.5, torch.float32),
    ([(0, 20), (40, 9)], 4, 1, 16, 16, 1, None, 0.2, torch.float32),  # each query sees only itself
    ([(0, 37), (9, 30)], 8, 2, 16, 16, 11, 5.0, 0.3, torch.bfloat16),
]


@pytest.mark.parametrize("case", range(len(FEATURE_CASES)))
def test_prefill_attention_window_and_softcap_match_reference(case, device, triton_path):
    chunks, num_heads, num_kv_heads, block_size, block_m, window, cap, scale, dtype = FEATURE_CASES[case]
    torch.manual_seed(420 + case)
    kv, q, query_start_loc, start_pos = varlen_inputs(chunks, num_heads, num_kv_heads, 64, block_size, dtype, device)
    features = dict(sliding_window=window, logits_soft_cap=cap)
    got = prefill_attention_triton(q, kv.k_cache, kv.v_cache, kv.block_tables, query_start_loc, start_pos, scale,
                                   max(n for _, n in chunks), block_m=block_m, **features)
    args = (q, *kv.clean(), kv.block_tables, query_start_loc, start_pos, scale)
    expected = paged_prefill_attention_varlen(*args, **features)
    torch.testing.assert_close(got, expected, **tolerance(dtype))
    assert not torch.allclose(expected.float(), paged_prefill_attention_varlen(*args).float(), atol=1e-2)


def test_prefill_attention_dispatch_takes_the_kernel(device, triton_path):
    torch.manual_seed(410)
    kv, q, query_start_loc, start_pos = varlen_inputs([(2, 3), (0, 4)], 4, 2, 64, 16, torch.float32, device)
    got = prefill_attention(q, kv.k_cache, kv.v_cache, kv.block_tables.long(), query_start_loc.long(),
                            start_pos.long(), 0.125)
    expected = paged_prefill_attention_varlen(q, *kv.clean(), kv.block_tables, query_start_loc, start_pos, 0.125)
    torch.testing.assert_close(got, expected, **tolerance(torch.float32))


def test_prefill_attention_launcher_rejects_bad_arguments(device, triton_path):
    kv, q, query_start_loc, start_pos = varlen_inputs([(0, 4)], 4, 2, 64, 16, torch.float32, device)
    with pytest.raises(ValueError, match="query_start_loc has shape"):
        prefill_attention_triton(q, kv.k_cache, kv.v_cache, kv.block_tables, query_start_loc[:1], start_pos, 1.0)
    with pytest.raises(ValueError, match="v_cache has dtype"):
        prefill_attention_triton(q, kv.k_cache, kv.v_cache.half(), kv.block_tables, query_start_loc, start_pos, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("window,cap", [(512, None), (100, 50.0), (None, 30.0)])
def test_prefill_attention_window_and_softcap_gpu(window, cap, cuda):
    chunks = [(0, 2048), (1024, 512), (4000, 96), (0, 1), (2047, 33)]
    torch.manual_seed(window or 0)
    kv, q, query_start_loc, start_pos = varlen_inputs(chunks, 16, 8, 256, 16, torch.bfloat16, cuda)
    features = dict(sliding_window=window, logits_soft_cap=cap)
    got = prefill_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, query_start_loc, start_pos, 0.0625,
                            max(n for _, n in chunks), **features)
    k_cache, v_cache = (c.float() for c in kv.clean())
    expected = paged_prefill_attention_varlen(q.float(), k_cache, v_cache, kv.block_tables, query_start_loc,
                                              start_pos, 0.0625, **features)
    torch.testing.assert_close(got.float(), expected, **tolerance(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("chunks", [[(0, 2048)], [(0, 1000), (1024, 512), (4000, 96), (0, 1), (2047, 33)]])
def test_prefill_attention_gpu(chunks, cuda):
    torch.manual_seed(len(chunks))
    kv, q, query_start_loc, start_pos = varlen_inputs(chunks, 32, 8, 128, 16, torch.bfloat16, cuda)
    got = prefill_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, query_start_loc, start_pos, 128**-0.5,
                            max(n for _, n in chunks))
    k_cache, v_cache = (c.float() for c in kv.clean())
    expected = paged_prefill_attention_varlen(q.float(), k_cache, v_cache, kv.block_tables, query_start_loc,
                                              start_pos, 128**-0.5)
    torch.testing.assert_close(got.float(), expected, **tolerance(torch.bfloat16))
