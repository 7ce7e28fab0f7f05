"""Fused MoE: the pair alignment's invariants, and the grouped-GEMM path against the per-expert reference (the
decode path, taken by fused_moe at these small token counts: test_moe_decode.py)."""

import pytest
import torch
from kernel_helpers import tolerance

from scaleinfer.kernels.moe import fused_moe, fused_moe_grouped, fused_moe_ref, fused_moe_triton
from scaleinfer.kernels.moe_align import align_pairs, align_pairs_ref, align_pairs_triton, max_rows

CASES = [  # (num_tokens, num_experts, top_k, hidden, inter, experts used: None = all, dtype)
    (9, 4, 2, 48, 40, None, torch.float32),  # N and K not multiples of the tiles
    (1, 4, 2, 64, 32, None, torch.float32),  # a single token
    (6, 4, 1, 32, 48, None, torch.float32),  # top_k 1
    (7, 8, 2, 32, 32, (1, 6), torch.float32),  # six experts get no token
    (20, 4, 2, 32, 32, (2,), torch.float32),  # every token's first choice is expert 2: several blocks
    (9, 4, 2, 48, 40, None, torch.bfloat16),
    (5, 4, 1, 64, 64, (0, 3), torch.bfloat16),
]


def random_moe(num_tokens, num_experts, top_k, hidden, inter, used, dtype, device, seed=0):
    """Inputs and weights of output scale ~1, drawn on the device; routing over `used` experts only (all when
    None)."""
    g = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, device=device)
    x = randn(num_tokens, hidden).to(dtype)
    w13 = (randn(num_experts, 2 * inter, hidden) / hidden**0.5).to(dtype)
    w2 = (randn(num_experts, hidden, inter) / inter**0.5).to(dtype)
    logits = randn(num_tokens, num_experts)
    if used is not None:
        logits[:, [e for e in range(num_experts) if e not in used]] = float("-inf")
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    return x, w13, w2, weights / weights.sum(-1, keepdim=True), ids


def kernel_tolerance(dtype: torch.dtype, device: torch.device) -> dict[str, float]:
    # The interpreter rounds float32 to bfloat16 toward zero, at three roundings (GEMM 1, SiLU, GEMM 2).
    return dict(atol=5e-2, rtol=2e-2) if dtype == torch.bfloat16 and device.type == "cpu" else tolerance(dtype)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_fused_moe_matches_reference(case, device, triton_path):
    num_tokens, num_experts, top_k, hidden, inter, used, dtype = CASES[case]
    x, w13, w2, weights, ids = random_moe(*CASES[case], device, seed=case)
    got = fused_moe_grouped(x, w13, w2, weights, ids)
    assert got.shape == (num_tokens, hidden) and got.dtype == dtype
    torch.testing.assert_close(got, fused_moe_ref(x, w13, w2, weights, ids), **kernel_tolerance(dtype, device))


def test_fused_moe_takes_int32_ids_and_no_tokens(device, triton_path):
    x, w13, w2, weights, ids = random_moe(4, 4, 2, 32, 32, None, torch.float32, device)
    expected = fused_moe_ref(x, w13, w2, weights, ids)
    torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids.int()), expected, **tolerance(torch.float32))
    empty = fused_moe(x[:0], w13, w2, weights[:0], ids[:0])
    assert empty.shape == (0, 32)


def test_reference_is_the_weighted_sum_of_each_tokens_experts():
    x, w13, w2, weights, ids = random_moe(3, 4, 2, 16, 8, None, torch.float64, torch.device("cpu"))
    for t in range(3):
        expected = 0
        for j in range(2):
            gate, up = (w13[ids[t, j]] @ x[t]).chunk(2)
            expected = expected + weights[t, j] * (w2[ids[t, j]] @ (torch.nn.functional.silu(gate) * up))
        torch.testing.assert_close(fused_moe_ref(x, w13, w2, weights, ids)[t], expected)


@pytest.mark.parametrize("num_tokens,top_k,block_m", [(1, 2, 16), (9, 2, 4), (20, 1, 8), (0, 2, 16)])
def test_align_pairs_groups_every_pair_once_in_blocks_of_one_expert(num_tokens, top_k, block_m):
    num_experts = 5
    g = torch.Generator().manual_seed(num_tokens)
    ids = torch.rand(num_tokens, num_experts, generator=g).argsort(-1)[:, :top_k]  # distinct experts per token
    ids[ids == 3] = 1  # expert 3 gets nothing
    align = align_pairs(ids, num_experts, block_m)
    num_pairs, num_rows = num_tokens * top_k, int(align.num_rows)
    sorted_ids = align.sorted_pair_ids
    assert sorted_ids.shape == (max_rows(num_pairs, num_experts, block_m),) and num_rows % block_m == 0
    assert sorted(sorted_ids[sorted_ids < num_pairs].tolist()) == list(range(num_pairs))
    assert (sorted_ids[num_rows:] == num_pairs).all()  # nothing past the rows in use
    experts_of_pairs = ids.flatten()
    for block in range(num_rows // block_m):
        rows = sorted_ids[block * block_m : (block + 1) * block_m]
        rows = rows[rows < num_pairs]
        assert len(rows) > 0  # no block is all padding
        assert (experts_of_pairs[rows.long()] == align.block_expert_ids[block]).all()
        assert rows.tolist() == sorted(rows.tolist())  # pairs in order within a group


@pytest.mark.parametrize(
    "num_tokens,top_k,num_experts,block_m",
    [(1, 2, 8, 16), (9, 2, 5, 4), (0, 2, 4, 16), (700, 2, 8, 16), (1500, 1, 3, 64)],
)
def test_align_kernel_equals_reference(num_tokens, top_k, num_experts, block_m, device, triton_path):
    """Exactly: the same rows in the same order (700 and 1500 tokens take the program several steps)."""
    g = torch.Generator().manual_seed(num_tokens)
    ids = torch.rand(num_tokens, num_experts, generator=g).argsort(-1)[:, :top_k].contiguous().to(device)
    got, expected = align_pairs_triton(ids, num_experts, block_m), align_pairs_ref(ids, num_experts, block_m)
    assert torch.equal(got.sorted_pair_ids, expected.sorted_pair_ids)
    assert torch.equal(got.block_expert_ids, expected.block_expert_ids)
    assert torch.equal(got.num_rows, expected.num_rows)


def test_launcher_rejects_bad_arguments(device, triton_path):
    x, w13, w2, weights, ids = random_moe(3, 4, 2, 32, 32, None, torch.float32, device)
    with pytest.raises(ValueError, match="w2 has shape"):
        fused_moe_triton(x, w13, w2[:, :, :16], weights, ids)
    with pytest.raises(ValueError, match="w13 has dtype"):
        fused_moe_triton(x, w13.double(), w2, weights, ids)
    with pytest.raises(ValueError, match="topk_ids has dtype"):
        fused_moe_triton(x, w13, w2, weights, ids.float())
    with pytest.raises(ValueError, match="w13 has strides"):
        fused_moe_triton(x, w13.transpose(1, 2).contiguous().transpose(1, 2), w2, weights, ids)
    with pytest.raises(ValueError, match="topk_weights has shape"):
        fused_moe_triton(x, w13, w2, weights[:, :1], ids)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 16, 300, 2048])
def test_fused_moe_gpu_mixtral_shape(num_tokens, cuda):
    """Mixtral-8x7B's expert shapes (hidden 4096, inter 14336, 8 experts, top 2) in bfloat16."""
    x, w13, w2, weights, ids = random_moe(num_tokens, 8, 2, 4096, 14336, None, torch.bfloat16, cuda, seed=num_tokens)
    got, expected = fused_moe(x, w13, w2, weights, ids), fused_moe_ref(x, w13, w2, weights, ids)
    torch.testing.assert_close(got, expected, **tolerance(torch.bfloat16))


@pytest.mark.gpu
def test_fused_moe_gpu_captures_in_a_cuda_graph_and_replays_new_routes(cuda):
    """No host sync inside: capture succeeds, and a replay with other experts chosen gives their output."""
    x, w13, w2, weights, ids = random_moe(4, 8, 2, 1024, 2048, None, torch.bfloat16, cuda)
    fused_moe(x, w13, w2, weights, ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, weights, ids)
    new_x, _, _, new_weights, new_ids = random_moe(4, 8, 2, 1024, 2048, (0, 5), torch.bfloat16, cuda, seed=9)
    x.copy_(new_x), weights.copy_(new_weights), ids.copy_(new_ids)
    graph.replay()
    torch.testing.assert_close(out, fused_moe_ref(x, w13, w2, weights, ids), **tolerance(torch.bfloat16))


@pytest.mark.parametrize("num_experts", [4, 5])
def test_negative_ids_take_no_row_and_no_expert(num_experts, device, triton_path):
    """The all-to-all's unused rows carry expert -1: the alignment gives them no row (kernel equals reference),
    and the other rows' outputs are those of the pairs without them."""
    x, w13, w2, weights, ids = random_moe(9, num_experts, 1, 32, 32, None, torch.float32, device, seed=4)
    ids = ids.int()
    unused = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0, 1], dtype=torch.bool, device=device)
    ids[unused] = -1
    got, expected = align_pairs_triton(ids, num_experts, 4), align_pairs_ref(ids, num_experts, 4)
    assert torch.equal(got.sorted_pair_ids, expected.sorted_pair_ids) and torch.equal(got.num_rows, expected.num_rows)
    kept = expected.sorted_pair_ids[expected.sorted_pair_ids < 9].sort().values
    assert kept.tolist() == (~unused).nonzero().flatten().tolist()
    out = fused_moe_grouped(x, w13, w2, weights, ids)
    reference = fused_moe_ref(x[~unused], w13, w2, weights[~unused], ids[~unused])
    torch.testing.assert_close(out[~unused], reference, **tolerance(torch.float32))
    assert (fused_moe_ref(x, w13, w2, weights, ids)[unused] == 0).all()
