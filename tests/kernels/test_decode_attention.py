"""Split-K paged decode attention against paged_decode_attention."""

import pytest
import torch
from kernel_helpers import paged_kv, tolerance

from scaleinfer.kernels import decode_attention as decode_attention_module
from scaleinfer.kernels.decode_attention import (
    MAX_ONE_PARTITION,
    DecodeTile,
    decode_attention,
    decode_attention_triton,
)
from scaleinfer.kernels.paged_attention import paged_decode_attention

CASES = [  # (context_lens, num_heads, num_kv_heads, head_dim, block_size, partition_size, dtype)
    ([1], 4, 4, 64, 16, None, torch.float32),
    ([1, 17, 40, 70], 8, 2, 64, 16, 32, torch.float32),  # crosses block and partition boundaries
    ([33, 5], 4, 1, 128, 8, 16, torch.float32),
    ([50, 16, 1], 8, 2, 128, 16, 32, torch.bfloat16),
    ([64, 9], 4, 4, 64, 4, None, torch.bfloat16),
]


FEATURES = [  # (sliding_window, logits_soft_cap, scale): Gemma-style options; the scale is not head_dim**-0.5
    (8, None, 0.3),
    (None, 4.0, 0.5),
    (20, 3.0, 0.25),
    (1, None, 0.1),  # each query sees only itself
]


def run_case(case, device, sliding_window=None, logits_soft_cap=None, scale=None, **kwargs):
    context_lens, num_heads, num_kv_heads, head_dim, block_size, partition_size, dtype = case
    scale = scale or head_dim**-0.5
    kv = paged_kv(context_lens, num_kv_heads, head_dim, block_size, dtype, device)
    q = torch.randn(len(context_lens), num_heads, head_dim, dtype=dtype, device=device)
    lens = torch.tensor(context_lens, device=device)
    out = torch.full_like(q, float("nan"))  # every element must be written
    features = dict(sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
    got = decode_attention_triton(q, kv.k_cache, kv.v_cache, kv.block_tables, lens, scale,
                                  out=out, partition_size=partition_size, **features, **kwargs)
    expected = paged_decode_attention(q, *kv.clean(), kv.block_tables, lens, scale, **features)
    assert got is out
    torch.testing.assert_close(got, expected, **tolerance(dtype))
    return expected, paged_decode_attention(q, *kv.clean(), kv.block_tables, lens, scale)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_decode_attention_matches_reference(case, device, triton_path):
    torch.manual_seed(300 + case)
    run_case(CASES[case], device)


@pytest.mark.parametrize("case", [1, 3, 4])
@pytest.mark.parametrize("feature", range(len(FEATURES)))
def test_decode_attention_window_and_softcap_match_reference(case, feature, device, triton_path):
    torch.manual_seed(320 + 10 * case + feature)
    window, cap, scale = FEATURES[feature]
    expected, plain = run_case(CASES[case], device, sliding_window=window, logits_soft_cap=cap, scale=scale)
    assert not torch.allclose(expected.float(), plain.float(), atol=1e-2)  # the features matter here


@pytest.mark.parametrize("tile", [DecodeTile(block_n=128, num_warps=8, num_stages=3), DecodeTile(block_n=32)])
@pytest.mark.parametrize("partition_size", [None, 128])
def test_decode_attention_tilings_match_reference(tile, partition_size, device, triton_path):
    """Tiles wider than a page and than a partition's tail, narrower than the default: the same answer."""
    torch.manual_seed(340)
    run_case(([1, 130, 300], 8, 2, 64, 16, partition_size, torch.float32), device, tile=tile)


def test_decode_attention_reads_only_to_a_tight_bound(device, triton_path):
    """max_context_len below the table's width: fewer partitions, the same answer."""
    torch.manual_seed(310)
    run_case(([12, 30, 31], 4, 2, 64, 4, 16, torch.float32), device, max_context_len=31)


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError(f"the reduce kernel was launched with grid {grid}")


@pytest.mark.parametrize("context_lens", [[MAX_ONE_PARTITION], [130, 1]])
def test_decode_attention_short_bound_runs_one_partition(context_lens, device, triton_path, monkeypatch):
    """Batch 1 or 2 under a bound of MAX_ONE_PARTITION tokens, too few programs to fill even the CPU's
    pretend 4 multiprocessors: still one partition walks the context whole and writes out; no reduce."""
    torch.manual_seed(312 + len(context_lens))
    monkeypatch.setattr(decode_attention_module, "_reduce_kernel", _NoLaunch())
    run_case((context_lens, 8, 2, 64, 16, None, torch.float32), device, max_context_len=MAX_ONE_PARTITION)


def test_partition_size_splits_only_bounds_past_one_partition(device):
    partition_size, num_sms = decode_attention_module._partition_size, decode_attention_module._num_sms(device)
    for num_groups in (1, 8, 4 * num_sms):
        for bound in (1, 100, 129, MAX_ONE_PARTITION):
            assert partition_size(num_groups, bound, device) >= bound, (num_groups, bound)
    # Too few (seq, kv_head) programs to fill the GPU: a longer bound is split.
    assert partition_size(1, 2 * MAX_ONE_PARTITION, device) < 2 * MAX_ONE_PARTITION
    # Enough programs already: one partition however long.
    assert partition_size(2 * num_sms, 8192, device) >= 8192


def test_decode_attention_dispatch_takes_the_kernel(device, triton_path):
    torch.manual_seed(311)
    kv = paged_kv([20, 3], 2, 64, 16, torch.float32, device, index_dtype=torch.int64)
    q = torch.randn(2, 4, 64, device=device)
    lens = torch.tensor([20, 3], device=device, dtype=torch.int32)
    got = decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, lens, 0.125)
    assert not got.isnan().any()  # the reference would read the poisoned padding
    torch.testing.assert_close(got, paged_decode_attention(q, *kv.clean(), kv.block_tables, lens, 0.125))


def test_decode_attention_launcher_rejects_bad_arguments(device, triton_path):
    kv = paged_kv([4], 2, 64, 16, torch.float32, device)
    q, lens = torch.randn(1, 6, 64, device=device), torch.tensor([4], device=device)
    with pytest.raises(ValueError, match="not a multiple"):
        decode_attention_triton(q[:, :5], kv.k_cache, kv.v_cache, kv.block_tables, lens, 1.0)
    with pytest.raises(ValueError, match="block_tables has dtype"):
        decode_attention_triton(q, kv.k_cache, kv.v_cache, kv.block_tables.float(), lens, 1.0)
    with pytest.raises(ValueError, match="partition_size is 24"):
        decode_attention_triton(q, kv.k_cache, kv.v_cache, kv.block_tables, lens, 1.0, partition_size=24)
    with pytest.raises(ValueError, match="sliding_window is 0"):
        decode_attention_triton(q, kv.k_cache, kv.v_cache, kv.block_tables, lens, 1.0, sliding_window=0)
    with pytest.raises(ValueError, match="logits_soft_cap is -1.0"):
        decode_attention_triton(q, kv.k_cache, kv.v_cache, kv.block_tables, lens, 1.0, logits_soft_cap=-1.0)
    with pytest.raises(ValueError, match="tile.block_n is 48"):
        decode_attention_triton(q, kv.k_cache, kv.v_cache, kv.block_tables, lens, 1.0, tile=DecodeTile(block_n=48))
    with pytest.raises(ValueError, match="tile.block_n is 8"):
        decode_attention_triton(q, kv.k_cache, kv.v_cache, kv.block_tables, lens, 1.0, tile=DecodeTile(block_n=8))


@pytest.mark.gpu
@pytest.mark.parametrize("context_lens", [[1], [4096], [1, 17, 513, 4096, 2048, 100, 3000, 64]])
def test_decode_attention_gpu(context_lens, cuda):
    torch.manual_seed(len(context_lens))
    kv = paged_kv(context_lens, 8, 128, 16, torch.bfloat16, cuda, extra_blocks=8)
    q = torch.randn(len(context_lens), 32, 128, dtype=torch.bfloat16, device=cuda)
    lens = torch.tensor(context_lens, device=cuda, dtype=torch.int32)
    got = decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, lens, 128**-0.5)
    expected = paged_decode_attention(q.float(), *(c.float() for c in kv.clean()), kv.block_tables, lens, 128**-0.5)
    torch.testing.assert_close(got.float(), expected, **tolerance(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("window,cap", [(4096, None), (1024, 50.0), (None, 30.0)])
def test_decode_attention_window_and_softcap_gpu(window, cap, cuda):
    context_lens = [1, 17, 1025, 8000, 4096, 100, 5000, 64]
    torch.manual_seed(len(context_lens))
    kv = paged_kv(context_lens, 8, 256, 16, torch.bfloat16, cuda, extra_blocks=8)
    q = torch.randn(len(context_lens), 16, 256, dtype=torch.bfloat16, device=cuda)
    lens = torch.tensor(context_lens, device=cuda, dtype=torch.int32)
    features = dict(sliding_window=window, logits_soft_cap=cap)
    got = decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, lens, 0.0625, **features)
    expected = paged_decode_attention(q.float(), *(c.float() for c in kv.clean()), kv.block_tables, lens, 0.0625,
                                      **features)
    torch.testing.assert_close(got.float(), expected, **tolerance(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("width", [MAX_ONE_PARTITION, 4096])  # one partition, split-K
def test_decode_attention_replays_in_a_cuda_graph(width, cuda):
    """Captured once at a fixed table width; replayed with other tables and lengths it stays right."""
    torch.manual_seed(0)
    kv = paged_kv([width] * 4, 8, 128, 16, torch.bfloat16, cuda)
    q = torch.randn(4, 32, 128, dtype=torch.bfloat16, device=cuda)
    lens = torch.tensor([min(n, width) for n in (4096, 1, 2000, 300)], device=cuda, dtype=torch.int32)
    tables, out = kv.block_tables.clone(), torch.empty_like(q)
    decode_attention(q, kv.k_cache, kv.v_cache, tables, lens, 0.1, out=out)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, kv.k_cache, kv.v_cache, tables, lens, 0.1, out=out)
    for new_lens in ([7, 4096, 1, 999], [1, 1, 1, 1], [130, 200, 255, 256]):
        lens.copy_(torch.tensor([min(n, width) for n in new_lens]))
        tables.copy_(kv.block_tables[torch.randperm(4, device=cuda)])
        q.normal_()
        graph.replay()
        expected = paged_decode_attention(q.float(), *(c.float() for c in kv.clean()), tables, lens, 0.1)
        torch.testing.assert_close(out.float(), expected, **tolerance(torch.bfloat16))
