"""The FP8 KV cache in the kernels: rotary_kv writes k / k_scale and v / v_scale in e4m3, decode and prefill
attention read them back with the layer's scales; each Triton kernel against its torch reference, and both
close to attention over the unquantized cache."""

import sys
from pathlib import Path

import pytest
import torch
from kernel_helpers import paged_kv, tolerance

from scaleinfer.kernels.decode_attention import decode_attention, decode_attention_triton
from scaleinfer.kernels.paged_attention import (
    FP8_CACHE_DTYPE,
    paged_decode_attention,
    paged_prefill_attention_varlen,
    to_cache,
)
from scaleinfer.kernels.prefill_attention import prefill_attention_triton
from scaleinfer.kernels.rotary_kv import rotary_kv_ref, rotary_kv_triton

SCALES = (0.05, 0.04)  # k_scale, v_scale: values up to 448 * scale (22, 18), so the scales matter
FP8_TOL = dict(atol=3e-2, rtol=3e-2)  # the kernels against the reference on the same fp8 cache


def fp8_caches(kv, k_scale=SCALES[0], v_scale=SCALES[1]):
    """(kernel caches, NaN in unused slots; reference caches, zeros there) in e4m3."""
    k_clean, v_clean = kv.clean()
    return ((to_cache(kv.k_cache, FP8_CACHE_DTYPE, k_scale), to_cache(kv.v_cache, FP8_CACHE_DTYPE, v_scale)),
            (to_cache(k_clean, FP8_CACHE_DTYPE, k_scale), to_cache(v_clean, FP8_CACHE_DTYPE, v_scale)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_kv_writes_the_references_fp8_values(dtype, device, triton_path):
    torch.manual_seed(0)
    num_tokens, heads, kv_heads, head_dim, half_rot = 7, 4, 2, 64, 16  # partial rotary: a tail too
    caches = [torch.zeros(4, 8, kv_heads, head_dim, dtype=FP8_CACHE_DTYPE, device=device) for _ in range(4)]
    positions = torch.randint(0, 100, (num_tokens,), device=device)
    slots = torch.randperm(32, device=device)[:num_tokens]
    angles = torch.rand(128, half_rot, device=device) * 6
    q, k, v = (torch.randn(num_tokens, n, head_dim, dtype=dtype, device=device) * 3
               for n in (heads, kv_heads, kv_heads))
    k[0, 0, 0] = 1e4  # saturates at 448 * k_scale, never NaN
    k_kernel = k.clone()  # rotated in place by the kernel: what its cache write must hold, in e4m3
    rotary_kv_triton(positions, q.clone(), k_kernel, v.clone(), angles.cos(), angles.sin(), *caches[:2], slots,
                     *SCALES)
    rotary_kv_ref(positions, q.clone(), k.clone(), v.clone(), angles.cos(), angles.sin(), *caches[2:], slots, *SCALES)
    written = caches[0].view(-1, kv_heads, head_dim)[slots.long()]
    assert torch.equal(written.float(), to_cache(k_kernel, FP8_CACHE_DTYPE, SCALES[0]).float())
    assert torch.equal(caches[1].float(), caches[3].float())  # v is not rotated: the same bytes
    if dtype == torch.float32:  # in bf16 the reference's rotation rounds its products: a step apart
        assert torch.equal(caches[0].float(), caches[2].float())
    assert caches[0].float().abs().max() == 448 and not caches[0].float().isnan().any()
    stored = caches[3].view(-1, kv_heads, head_dim)[slots.long()].float() * SCALES[1]
    torch.testing.assert_close(stored, v.float(), atol=SCALES[1], rtol=0.07)  # v / v_scale, back by * v_scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_on_an_fp8_cache_matches_reference(dtype, device, triton_path):
    torch.manual_seed(1)
    context_lens, heads, kv_heads, head_dim = [1, 40, 70], 8, 2, 64
    kv = paged_kv(context_lens, kv_heads, head_dim, 16, torch.float32, device)
    (k8, v8), (k8_ref, v8_ref) = fp8_caches(kv)
    q = torch.randn(len(context_lens), heads, head_dim, dtype=dtype, device=device)
    lens = torch.tensor(context_lens, device=device)
    got = decode_attention_triton(q, k8, v8, kv.block_tables, lens, 0.125, partition_size=32, k_scale=SCALES[0],
                                  v_scale=SCALES[1])
    want = paged_decode_attention(q, k8_ref, v8_ref, kv.block_tables, lens, 0.125, k_scale=SCALES[0],
                                  v_scale=SCALES[1])
    torch.testing.assert_close(got, want, **FP8_TOL)
    exact = paged_decode_attention(q.float(), *kv.clean(), kv.block_tables, lens, 0.125)
    assert (want.float() - exact).norm() / exact.norm() < 0.06  # e4m3 keeps 3 mantissa bits
    wrong = paged_decode_attention(q, k8_ref, v8_ref, kv.block_tables, lens, 0.125)  # scales forgotten
    assert (wrong.float() - exact).norm() / exact.norm() > 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_attention_on_an_fp8_cache_matches_reference(dtype, device, triton_path):
    torch.manual_seed(2)
    chunks, starts, heads, kv_heads, head_dim = [5, 19], [0, 13], 4, 2, 64
    kv = paged_kv([c + s for c, s in zip(chunks, starts)], kv_heads, head_dim, 8, torch.float32, device)
    (k8, v8), (k8_ref, v8_ref) = fp8_caches(kv)
    q = torch.randn(sum(chunks), heads, head_dim, device=device, dtype=dtype)
    loc = torch.tensor([0, chunks[0], sum(chunks)], device=device)
    start = torch.tensor(starts, device=device)
    got = prefill_attention_triton(q, k8, v8, kv.block_tables, loc, start, 0.125, k_scale=SCALES[0],
                                   v_scale=SCALES[1])
    want = paged_prefill_attention_varlen(q, k8_ref, v8_ref, kv.block_tables, loc, start, 0.125,
                                          k_scale=SCALES[0], v_scale=SCALES[1])
    torch.testing.assert_close(got, want, **FP8_TOL)
    exact = paged_prefill_attention_varlen(q.float(), *kv.clean(), kv.block_tables, loc, start, 0.125)
    assert (want.float() - exact).norm() / exact.norm() < 0.06


def test_a_cache_of_another_dtype_is_refused(device, triton_path):
    kv = paged_kv([4], 2, 64, 16, torch.float32, device)
    q = torch.randn(1, 2, 64, device=device)
    with pytest.raises(ValueError, match="k_cache has dtype torch.float16, expected torch.float32 like the input"):
        decode_attention(q, kv.k_cache.half(), kv.v_cache.half(), kv.block_tables, torch.tensor([4], device=device),
                         0.125)


@pytest.mark.gpu
@pytest.mark.parametrize("context_lens", [[1, 300, 4000], [17] * 64])
def test_fp8_cache_decode_gpu_in_a_cuda_graph(context_lens, cuda):
    """bf16 queries over an e4m3 cache, split-K partitions, captured and replayed on fresh queries."""
    torch.manual_seed(3)
    kv = paged_kv(context_lens, 8, 128, 16, torch.bfloat16, cuda)
    (k8, v8), (k8_ref, v8_ref) = fp8_caches(kv)
    q = torch.randn(len(context_lens), 32, 128, dtype=torch.bfloat16, device=cuda)
    lens = torch.tensor(context_lens, device=cuda)
    args = (kv.block_tables, lens, 128**-0.5)
    decode_attention(q, k8, v8, *args, k_scale=SCALES[0], v_scale=SCALES[1])  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k8, v8, *args, k_scale=SCALES[0], v_scale=SCALES[1])
    q.copy_(torch.randn_like(q))
    graph.replay()
    want = paged_decode_attention(q, k8_ref, v8_ref, *args, k_scale=SCALES[0], v_scale=SCALES[1])
    torch.testing.assert_close(out, want, **FP8_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["bf16", "fp8"])
def test_every_benchmarked_decode_tile_matches_reference_gpu(cache, cuda):
    """bench/decode_attention_tiles.py's candidates, over both caches, one partition and split-K."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from decode_attention_tiles import CANDIDATES

    torch.manual_seed(4)
    context_lens = [1, 300, 4000, 129]
    kv = paged_kv(context_lens, 8, 128, 16, torch.bfloat16, cuda)
    (k8, v8), (k8_ref, v8_ref) = fp8_caches(kv)
    if cache == "fp8":
        caches, refs, scales, tol = (k8, v8), (k8_ref, v8_ref), SCALES, FP8_TOL
    else:  # the kernel's caches hold NaN where no token is: a tile must not read them
        caches, refs, scales, tol = (kv.k_cache, kv.v_cache), kv.clean(), (1.0, 1.0), tolerance(torch.bfloat16)
    q = torch.randn(len(context_lens), 32, 128, dtype=torch.bfloat16, device=cuda)
    lens = torch.tensor(context_lens, device=cuda)
    want = paged_decode_attention(q, *refs, kv.block_tables, lens, 128**-0.5, k_scale=scales[0], v_scale=scales[1])
    for tile in CANDIDATES:
        for partition_size in (None, 8192):
            got = decode_attention_triton(q, *caches, kv.block_tables, lens, 128**-0.5, partition_size=partition_size,
                                          k_scale=scales[0], v_scale=scales[1], tile=tile)
            torch.testing.assert_close(got, want, **tol)
