"""Non-causal varlen encoder attention over packed q/k/v against its per-sequence SDPA reference."""

import pytest
import torch
from kernel_helpers import tolerance

from scaleinfer.kernels.encoder_attention import (
    encoder_attention,
    encoder_attention_reference,
    encoder_attention_triton,
)

CASES = [  # (seq_lens, num_heads, head_dim, block_m, block_n, dtype)
    ([9], 4, 32, None, None, torch.float32),
    ([1, 16, 17, 5, 40], 2, 64, 16, 16, torch.float32),  # a lone token, whole tiles, ragged tails
    ([33, 2, 20], 3, 48, 32, 16, torch.float32),  # head_dim padded to 64 in the tile
    ([12, 31, 1], 4, 32, 16, 32, torch.bfloat16),
    ([0, 7, 0, 18], 2, 32, None, None, torch.float32),  # empty sequences write nothing
]


def packed_qkv(seq_lens, num_heads, head_dim, dtype, device):
    """q, k, v as views into one fused [num_tokens, 3 * num_heads * head_dim] projection (as BERT's qkv
    linear gives them: rows strided by the fused width), and cu_seqlens."""
    qkv = torch.randn(sum(seq_lens), 3 * num_heads * head_dim, dtype=dtype, device=device)
    q, k, v = (t.view(-1, num_heads, head_dim) for t in qkv.split(num_heads * head_dim, dim=-1))
    cu_seqlens = torch.tensor([0, *seq_lens], device=device).cumsum(0).int()
    return q, k, v, cu_seqlens


def block_diagonal_attention(q, k, v, seq_lens, scale):
    """An independent oracle: softmax over all tokens with scores across sequences set to -inf."""
    seq_ids = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(seq_lens)).to(q.device)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale  # [num_heads, num_tokens, num_tokens]
    scores = scores.masked_fill(seq_ids[:, None] != seq_ids[None, :], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float()).to(q.dtype)


def test_reference_is_block_diagonal_softmax(device):
    torch.manual_seed(600)
    seq_lens = [5, 1, 12, 7]
    q, k, v, cu_seqlens = packed_qkv(seq_lens, 3, 16, torch.float32, device)
    expected = block_diagonal_attention(q, k, v, seq_lens, 0.3)
    torch.testing.assert_close(encoder_attention_reference(q, k, v, cu_seqlens, 0.3), expected, **tolerance(q.dtype))
    # non-causal: the first token of a sequence sees its last key
    k[4] += 10.0
    assert not torch.allclose(encoder_attention_reference(q, k, v, cu_seqlens, 0.3)[0], expected[0], atol=1e-3)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_encoder_attention_matches_reference(case, device, triton_path):
    seq_lens, num_heads, head_dim, block_m, block_n, dtype = CASES[case]
    torch.manual_seed(610 + case)
    q, k, v, cu_seqlens = packed_qkv(seq_lens, num_heads, head_dim, dtype, device)
    out = torch.full_like(q, float("nan"), memory_format=torch.contiguous_format)  # every row must be written
    scale = head_dim**-0.5
    got = encoder_attention_triton(q, k, v, cu_seqlens, max(seq_lens), scale, out=out, block_m=block_m,
                                   block_n=block_n)
    assert got is out
    torch.testing.assert_close(got, encoder_attention_reference(q, k, v, cu_seqlens, scale), **tolerance(dtype))


def test_encoder_attention_dispatch(device, triton_path):
    torch.manual_seed(620)
    seq_lens = [3, 20]
    q, k, v, cu_seqlens = packed_qkv(seq_lens, 2, 32, torch.float32, device)
    got = encoder_attention(q, k, v, cu_seqlens.long(), max(seq_lens), 0.2)
    torch.testing.assert_close(got, block_diagonal_attention(q, k, v, seq_lens, 0.2), **tolerance(torch.float32))


def test_encoder_attention_rejects_bad_arguments(device, triton_path):
    q, k, v, cu_seqlens = packed_qkv([4, 3], 2, 32, torch.float32, device)
    with pytest.raises(ValueError, match="k has shape"):
        encoder_attention_triton(q, k[:, :1], v, cu_seqlens, 4, 1.0)
    with pytest.raises(ValueError, match="v has dtype"):
        encoder_attention_triton(q, k, v.double(), cu_seqlens, 4, 1.0)
    with pytest.raises(ValueError, match="cu_seqlens has dtype"):
        encoder_attention_triton(q, k, v, cu_seqlens.float(), 4, 1.0)
    with pytest.raises(ValueError, match="block_n is 8"):
        encoder_attention_triton(q, k, v, cu_seqlens, 4, 1.0, block_n=8)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,num_heads", [(32, 12), (64, 16)])  # MiniLM, BERT-large
def test_encoder_attention_gpu(head_dim, num_heads, cuda):
    torch.manual_seed(head_dim)
    seq_lens = [1, 512, 63, 64, 65, 200, 7] + [int(n) for n in torch.randint(1, 256, (57,))]
    q, k, v, cu_seqlens = packed_qkv(seq_lens, num_heads, head_dim, torch.bfloat16, cuda)
    got = encoder_attention(q, k, v, cu_seqlens, max(seq_lens), head_dim**-0.5)
    expected = encoder_attention_reference(q.float(), k.float(), v.float(), cu_seqlens, head_dim**-0.5)
    torch.testing.assert_close(got.float(), expected, **tolerance(torch.bfloat16))
