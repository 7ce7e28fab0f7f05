"""The fused MoE's decode path (GEMV per token-expert pair) against the per-expert reference, and fused_moe's
dispatch to it."""

import pytest
import torch
from kernel_helpers import tolerance
from test_moe import kernel_tolerance, random_moe

from scaleinfer.kernels.moe import fused_moe, fused_moe_grouped, fused_moe_ref
from scaleinfer.kernels.moe_decode import MAX_DECODE_PAIRS, fused_moe_decode, use_decode_path

CASES = [  # (num_tokens, num_experts, top_k, hidden, inter, dtype)
    (1, 16, 1, 64, 32, torch.float32),
    (1, 16, 2, 64, 32, torch.float32),
    (1, 16, 8, 64, 32, torch.float32),
    (2, 16, 8, 64, 32, torch.float32),
    (8, 16, 8, 64, 32, torch.float32),  # 64 pairs: past fused_moe's bound, still the decode kernel's contract
    (8, 16, 2, 48, 40, torch.float32),  # N and K not multiples of the tiles
    (2, 4, 2, 64, 32, torch.float32),  # few experts: pairs share them
    (8, 4, 1, 64, 32, torch.float32),
    (1, 16, 8, 64, 32, torch.bfloat16),
    (8, 4, 2, 48, 40, torch.bfloat16),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_decode_path_matches_reference(case, device, triton_path):
    num_tokens, num_experts, top_k, hidden, inter, dtype = CASES[case]
    x, w13, w2, weights, ids = random_moe(num_tokens, num_experts, top_k, hidden, inter, None, dtype, device, case)
    got = fused_moe_decode(x, w13, w2, weights, ids)
    assert got.shape == (num_tokens, hidden) and got.dtype == dtype
    torch.testing.assert_close(got, fused_moe_ref(x, w13, w2, weights, ids), **kernel_tolerance(dtype, device))


@pytest.mark.parametrize("top_k", [1, 2])
def test_skewed_routing_every_pair_to_one_expert(top_k, device, triton_path):
    x, w13, w2, weights, ids = random_moe(8, 16, top_k, 64, 32, None, torch.float32, device, seed=top_k)
    ids = torch.full_like(ids, 5)  # both slots of a token may name one expert: each pair still counts
    got = fused_moe_decode(x, w13, w2, weights, ids)
    torch.testing.assert_close(got, fused_moe_ref(x, w13, w2, weights, ids), **tolerance(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_negative_ids_add_nothing_and_empty_rows_are_zero(dtype, device, triton_path):
    """The expert-parallel all-to-all's unused rows carry -1 (top_k 1); a -1 slot of a top_k 2 row adds nothing."""
    for top_k, rows in ((1, [0, 3, 4]), (2, [1, 6])):
        x, w13, w2, weights, ids = random_moe(8, 4, top_k, 64, 32, None, dtype, device, seed=7 + top_k)
        ids = ids.int()
        ids[rows] = -1
        ids[2, -1] = -1
        got = fused_moe_decode(x, w13, w2, weights, ids)
        assert (got[rows] == 0).all()
        torch.testing.assert_close(got, fused_moe_ref(x, w13, w2, weights, ids), **kernel_tolerance(dtype, device))


def test_fused_moe_takes_the_decode_path_up_to_the_bound(device, triton_path):
    assert use_decode_path(MAX_DECODE_PAIRS // 8, 8) and not use_decode_path(MAX_DECODE_PAIRS // 8 + 1, 8)
    x, w13, w2, weights, ids = random_moe(4, 16, 2, 64, 32, None, torch.float32, device, seed=3)
    assert torch.equal(fused_moe(x, w13, w2, weights, ids), fused_moe_decode(x, w13, w2, weights, ids))
    x, w13, w2, weights, ids = random_moe(MAX_DECODE_PAIRS + 1, 4, 1, 32, 32, None, torch.float32, device, seed=4)
    assert torch.equal(fused_moe(x, w13, w2, weights, ids), fused_moe_grouped(x, w13, w2, weights, ids))


QWEN3_30B_A3B = (128, 8, 2048, 768)  # (num_experts, top_k, hidden, moe_intermediate)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 2, 8])
def test_decode_path_gpu_qwen3_moe_shape(num_tokens, cuda):
    experts, top_k, hidden, inter = QWEN3_30B_A3B
    x, w13, w2, weights, ids = random_moe(num_tokens, experts, top_k, hidden, inter, None, torch.bfloat16, cuda)
    got = fused_moe_decode(x, w13, w2, weights, ids)
    torch.testing.assert_close(got, fused_moe_ref(x, w13, w2, weights, ids), **tolerance(torch.bfloat16))
    torch.testing.assert_close(got, fused_moe_grouped(x, w13, w2, weights, ids), **tolerance(torch.bfloat16))


@pytest.mark.gpu
def test_decode_path_gpu_replays_in_a_cuda_graph_with_new_routes(cuda):
    """No host sync: the captured decode path follows routes (and -1 rows) written after the capture."""
    experts, top_k, hidden, inter = QWEN3_30B_A3B
    x, w13, w2, weights, ids = random_moe(4, experts, top_k, hidden, inter, None, torch.bfloat16, cuda)
    fused_moe(x, w13, w2, weights, ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, weights, ids)
    new_x, _, _, new_weights, new_ids = random_moe(4, experts, top_k, hidden, inter, (3, 9, 17, 40, 64, 80, 99, 127),
                                                   torch.bfloat16, cuda, seed=9)
    new_ids[1] = -1
    x.copy_(new_x), weights.copy_(new_weights), ids.copy_(new_ids)
    graph.replay()
    assert (out[1] == 0).all()
    torch.testing.assert_close(out, fused_moe_ref(x, w13, w2, weights, ids), **tolerance(torch.bfloat16))
