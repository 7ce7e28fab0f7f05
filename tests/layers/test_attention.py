"""The attention layer through the Triton kernels (the interpreter, on CPU) against its torch references:
whole, partial and no rotary, all through the one fused rotary + cache-write kernel, with a sliding window
and soft-capped scores, over a step holding a decode and a prefill chunk."""

import pytest
import torch

from scaleinfer.kernels.dispatch import HAS_TRITON, force_triton
from scaleinfer.layers.attention import Attention, AttentionMetadata, PrefillMetadata
from scaleinfer.layers.rotary import RotaryEmbedding

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 4, 2, 32, 16, 4

pytestmark = pytest.mark.skipif(not HAS_TRITON or torch.cuda.is_available(),
                                reason="compares the interpreted kernels with the references, off the GPU")


def step_metadata() -> AttentionMetadata:
    """Sequence 0 decodes its 20th token (blocks 3, 1); sequence 1 prefills positions 5..11 (block 0)."""
    prefill = PrefillMetadata(block_tables=torch.tensor([[0, 0]]), query_start_loc=torch.tensor([0, 7]),
                              start_pos=torch.tensor([5]), max_query_len=7)
    return AttentionMetadata(slot_mapping=torch.tensor([1 * BLOCK_SIZE + 3, *range(5, 12)]), num_decodes=1,
                             decode_block_tables=torch.tensor([[3, 1]]), decode_context_lens=torch.tensor([20]),
                             prefill=prefill)


def run_layer(layer: Attention, inputs: list[torch.Tensor], caches: torch.Tensor) -> list[torch.Tensor]:
    positions, q, k, v = (t.clone() for t in inputs)
    layer.k_cache, layer.v_cache = caches.clone().unbind(0)
    out = layer(positions, q, k, v, step_metadata())
    return [out, layer.k_cache, layer.v_cache]


@pytest.mark.parametrize("rotary_dim", [HEAD_DIM, 8, None])
@pytest.mark.parametrize("window,cap", [(None, None), (6, 4.0)])
def test_layer_kernels_match_references(rotary_dim, window, cap):
    torch.manual_seed(rotary_dim or 0)
    rope = RotaryEmbedding(rotary_dim, 64, 10000.0, None) if rotary_dim else None
    layer = Attention(NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, 0.3, rope, sliding_window=window, logits_soft_cap=cap)
    positions = torch.tensor([19, *range(5, 12)])
    q = torch.randn(8, NUM_HEADS, HEAD_DIM)
    k, v = torch.randn(8, NUM_KV_HEADS, HEAD_DIM), torch.randn(8, NUM_KV_HEADS, HEAD_DIM)
    caches = torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    expected = run_layer(layer, [positions, q, k, v], caches)
    with force_triton():
        got = run_layer(layer, [positions, q, k, v], caches)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
