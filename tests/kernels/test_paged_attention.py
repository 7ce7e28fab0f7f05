"""The paged attention references against plain causal attention on the same K/V."""

import math

import pytest
import torch

from scaleinfer.kernels.paged_attention import paged_decode_attention, paged_prefill_attention, write_kv_cache

BLOCK_SIZE, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 6, 2, 16


def dense_causal(q, k, v, start_pos, scale=None, window=None, cap=None):
    """q: [Q, H, D] at positions start_pos..; k, v: [ctx, KVH, D] -> [Q, H, D]. Query p sees keys in
    (p - window, p]; scores are capped at cap * tanh(score / cap)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * (scale or 1 / math.sqrt(q.shape[-1]))
    if cap is not None:
        scores = cap * torch.tanh(scores / cap)
    query_pos = torch.arange(start_pos, start_pos + q.shape[0])[:, None]
    key_pos = torch.arange(k.shape[0])[None, :]
    hidden = (key_pos > query_pos) | (key_pos <= query_pos - (window or k.shape[0] + start_pos + 1))
    scores = scores.masked_fill(hidden, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def cache_with(seqs_kv, num_blocks=64):
    """Write each sequence's K/V into shuffled blocks; returns caches and block tables."""
    k_cache = torch.zeros(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    v_cache = torch.zeros_like(k_cache)
    free = torch.randperm(num_blocks).tolist()
    tables = []
    for k, v in seqs_kv:
        table = [free.pop() for _ in range(-(-k.shape[0] // BLOCK_SIZE))]
        slots = torch.tensor([table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(k.shape[0])])
        write_kv_cache(k, v, k_cache, v_cache, slots)
        tables.append(table)
    return k_cache, v_cache, tables


@pytest.mark.parametrize("context_lens", [[1], [5, 17, 8], [33, 4]])
def test_decode_matches_dense(context_lens):
    torch.manual_seed(len(context_lens))
    kvs = [(torch.randn(n, NUM_KV_HEADS, HEAD_DIM), torch.randn(n, NUM_KV_HEADS, HEAD_DIM)) for n in context_lens]
    k_cache, v_cache, tables = cache_with(kvs)
    width = max(map(len, tables))
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.randn(len(context_lens), NUM_HEADS, HEAD_DIM)
    out = paged_decode_attention(q, k_cache, v_cache, block_tables, torch.tensor(context_lens), HEAD_DIM**-0.5)
    for i, (k, v) in enumerate(kvs):
        expected = dense_causal(q[i : i + 1], k, v, start_pos=k.shape[0] - 1)
        torch.testing.assert_close(out[i], expected[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("start_pos,num_query", [(0, 9), (8, 5), (3, 1), (13, 20)])
def test_prefill_chunk_matches_dense(start_pos, num_query):
    torch.manual_seed(start_pos)
    n = start_pos + num_query
    k, v = torch.randn(n, NUM_KV_HEADS, HEAD_DIM), torch.randn(n, NUM_KV_HEADS, HEAD_DIM)
    k_cache, v_cache, (table,) = cache_with([(k, v)])
    q = torch.randn(num_query, NUM_HEADS, HEAD_DIM)
    out = paged_prefill_attention(q, k_cache, v_cache, torch.tensor(table), start_pos, HEAD_DIM**-0.5)
    torch.testing.assert_close(out, dense_causal(q, k, v, start_pos), atol=1e-5, rtol=1e-5)



FEATURES = [(3, None), (None, 2.0), (6, 1.5)]  # (sliding_window, logits_soft_cap)


@pytest.mark.parametrize("window,cap", FEATURES)
def test_decode_window_and_softcap_match_dense(window, cap):
    torch.manual_seed(7)
    context_lens = [1, 9, 17]
    kvs = [(torch.randn(n, NUM_KV_HEADS, HEAD_DIM), torch.randn(n, NUM_KV_HEADS, HEAD_DIM)) for n in context_lens]
    k_cache, v_cache, tables = cache_with(kvs)
    width = max(map(len, tables))
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.randn(len(context_lens), NUM_HEADS, HEAD_DIM)
    out = paged_decode_attention(q, k_cache, v_cache, block_tables, torch.tensor(context_lens), 0.7, window, cap)
    for i, (k, v) in enumerate(kvs):
        expected = dense_causal(q[i : i + 1], k, v, k.shape[0] - 1, 0.7, window, cap)
        torch.testing.assert_close(out[i], expected[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window,cap", FEATURES)
@pytest.mark.parametrize("start_pos,num_query", [(0, 9), (13, 20)])
def test_prefill_window_and_softcap_match_dense(start_pos, num_query, window, cap):
    torch.manual_seed(start_pos)
    n = start_pos + num_query
    k, v = torch.randn(n, NUM_KV_HEADS, HEAD_DIM), torch.randn(n, NUM_KV_HEADS, HEAD_DIM)
    k_cache, v_cache, (table,) = cache_with([(k, v)])
    q = torch.randn(num_query, NUM_HEADS, HEAD_DIM)
    out = paged_prefill_attention(q, k_cache, v_cache, torch.tensor(table), start_pos, 0.7, window, cap)
    torch.testing.assert_close(out, dense_causal(q, k, v, start_pos, 0.7, window, cap), atol=1e-5, rtol=1e-5)
