"""Rotary embedding fused with the KV-cache write, against RoPE + write_kv_cache: whole-head, partial
(GPT-NeoX, rotary_dim < head_dim) and no rotation (rotary_dim 0, GPT-2)."""

import pytest
import torch
from kernel_helpers import tolerance

from scaleinfer.kernels.rotary_kv import rotary_kv, rotary_kv_ref, rotary_kv_triton

MAX_POSITION = 64


def rope_caches(rotary_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / max(rotary_dim, 1)))
    freqs = torch.outer(torch.arange(MAX_POSITION).float(), inv_freq)  # [max_position, rotary_dim / 2]
    return freqs.cos().to(device), freqs.sin().to(device)


def fused_qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device):
    """q, k, v as views of one fused projection output, the way the attention layer splits it."""
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, device=device)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim), \
        v.view(num_tokens, num_kv_heads, head_dim)


CASES = [  # (num_tokens, num_heads, num_kv_heads, head_dim, rotary_dim, block_size, dtype)
    (5, 4, 4, 64, 64, 16, torch.float32),
    (7, 8, 2, 128, 128, 4, torch.float32),
    (6, 8, 2, 64, 64, 16, torch.bfloat16),
    (1, 6, 3, 32, 32, 8, torch.bfloat16),
    (5, 4, 4, 80, 20, 16, torch.float32),  # Pythia-2.8B's head: rotary_pct 0.25, tail of 60
    (6, 4, 2, 96, 48, 8, torch.bfloat16),
    (4, 4, 4, 64, 16, 16, torch.bfloat16),
    (5, 4, 4, 64, 0, 16, torch.float32),  # no rotation: the cache write alone
    (3, 6, 2, 48, 0, 4, torch.bfloat16),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_rotary_kv_matches_rope_then_cache_write(case, device, triton_path):
    num_tokens, num_heads, num_kv_heads, head_dim, rotary_dim, block_size, dtype = CASES[case]
    torch.manual_seed(200 + case)
    cos, sin = rope_caches(rotary_dim, device)
    q, k, v = fused_qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), device=device)
    num_blocks = 2 * num_tokens // block_size + 2
    slot_mapping = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slot_mapping[num_tokens // 2] = -1  # a padding token: rotated, not written
    caches = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    expected = [t.clone() for t in (q, k, v, caches)]
    rotary_kv_ref(positions, *expected[:3], cos, sin, expected[3][0], expected[3][1], slot_mapping)
    before = q.clone()
    rotary_kv(positions.int(), q, k, v, cos, sin, caches[0], caches[1], slot_mapping.int())
    for got, want in zip((q, k, v, caches), expected):
        torch.testing.assert_close(got, want, **tolerance(dtype))
    assert torch.equal(q[..., rotary_dim:], before[..., rotary_dim:])  # past rotary_dim: as it was
    assert rotary_dim == 0 or not torch.allclose(q[..., :rotary_dim], before[..., :rotary_dim])


def test_rotary_kv_launcher_rejects_bad_arguments(device, triton_path):
    cos, sin = rope_caches(16, device)
    q, k, v = fused_qkv(2, 2, 1, 16, torch.float32, device)
    k_cache = torch.zeros(2, 4, 1, 16, device=device)
    positions, slots = torch.arange(2, device=device), torch.arange(2, device=device)
    with pytest.raises(ValueError, match="k_cache has dtype"):
        rotary_kv_triton(positions, q, k, v, cos, sin, k_cache.half(), k_cache.half(), slots)
    with pytest.raises(ValueError, match="cos_cache has dtype"):
        rotary_kv_triton(positions, q, k, v, cos.double(), sin.double(), k_cache, k_cache.clone(), slots)
    with pytest.raises(ValueError, match="slot_mapping has shape"):
        rotary_kv_triton(positions, q, k, v, cos, sin, k_cache, k_cache.clone(), slots[:1])
    wide_cos, wide_sin = rope_caches(32, device)
    with pytest.raises(ValueError, match="rotary dim 32 exceeds head_dim 16"):
        rotary_kv_triton(positions, q, k, v, wide_cos, wide_sin, k_cache, k_cache.clone(), slots)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 256, 4096])
@pytest.mark.parametrize("head_dim,rotary_dim", [(128, 128), (80, 20), (64, 0)])
def test_rotary_kv_gpu(num_tokens, head_dim, rotary_dim, cuda):
    torch.manual_seed(num_tokens)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, rotary_dim, 2).float() / max(rotary_dim, 1)))
    freqs = torch.outer(torch.arange(8192).float(), inv_freq)
    cos, sin = freqs.cos().to(cuda), freqs.sin().to(cuda)
    q, k, v = fused_qkv(num_tokens, 32, 8, head_dim, torch.bfloat16, cuda)
    positions = torch.randint(0, 8192, (num_tokens,), device=cuda)
    slot_mapping = torch.randperm(1024 * 16, device=cuda)[:num_tokens]
    caches = torch.randn(2, 1024, 16, 8, head_dim, dtype=torch.bfloat16, device=cuda)
    expected = [t.clone() for t in (q, k, v, caches)]
    rotary_kv_ref(positions, *expected[:3], cos, sin, expected[3][0], expected[3][1], slot_mapping)
    rotary_kv(positions, q, k, v, cos, sin, caches[0], caches[1], slot_mapping)
    for got, want in zip((q, k, v, caches), expected):
        torch.testing.assert_close(got, want, **tolerance(torch.bfloat16))
