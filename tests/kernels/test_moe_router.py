"""The fused MoE router (kernels/moe_router.py) against the torch path (softmax, topk, renormalize) and a
tie-exact reference; its tie rule (lowest expert index first); select_experts' dispatch to it; on a GPU, a
CUDA graph capture replayed with new logits."""

import pytest
import torch

import scaleinfer.layers.moe as moe_layer
from scaleinfer.kernels.moe_router import MAX_EXPERTS, MAX_TOP_K, route, route_ref, route_supported
from scaleinfer.layers.moe import select_experts

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
WEIGHT_TOLERANCE = dict(atol=1e-6, rtol=1e-5)  # float32 softmax both ways, exp and sums in other orders


def reference(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch path with the kernel's tie rule: experts by descending float32 logit, equal logits by
    ascending index (a stable sort), then their softmax probabilities, renormalized when asked."""
    x = logits.float()
    ids = torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = torch.softmax(x, dim=-1).gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def check_route(logits: torch.Tensor, top_k: int, renormalize: bool) -> None:
    weights, ids = route(logits, top_k, renormalize)
    assert weights.shape == ids.shape == (logits.shape[0], top_k)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64 and weights.device == logits.device
    ref_weights, ref_ids = reference(logits, top_k, renormalize)
    torch.testing.assert_close(ids, ref_ids, atol=0, rtol=0)
    torch.testing.assert_close(weights, ref_weights, **WEIGHT_TOLERANCE)
    # the torch path itself: the same top-k values whatever its order of ties
    torch.testing.assert_close(weights, route_ref(logits, top_k, renormalize)[0], **WEIGHT_TOLERANCE)


@pytest.mark.parametrize("top_k", [1, 2, 4, 8])
@pytest.mark.parametrize("num_experts", [8, 60, 64, 128])
@pytest.mark.parametrize("num_tokens", [1, 3, 17, 64])
def test_route_matches_torch(num_tokens, num_experts, top_k, device, triton_path):
    """Fresh random logits of every dtype (bfloat16 and float16 rows of 60+ experts hold equal logits: the tie
    rule decides their order), renormalized and not."""
    g = torch.Generator().manual_seed(1000 * num_tokens + 10 * num_experts + top_k)
    for dtype in DTYPES:
        logits = (2 * torch.randn(num_tokens, num_experts, generator=g)).to(dtype).to(device)
        for renormalize in (True, False):
            check_route(logits, top_k, renormalize)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_take_the_lowest_expert_index_first(dtype, device, triton_path):
    logits = torch.tensor([
        [0.0, 2.0, 1.0, 2.0, 1.0, 1.0, 0.0, 2.0],  # three tied at the top, three at the cut
        [1.0] * 8,  # all equal
        [-1.0, 3.0, -1.0, -1.0, 3.0, -1.0, 3.0, 3.0],
    ], dtype=dtype, device=device)
    for renormalize in (False, True):
        weights, ids = route(logits, 4, renormalize)
        assert ids.tolist() == [[1, 3, 7, 2], [0, 1, 2, 3], [1, 4, 6, 7]]
        torch.testing.assert_close(weights, reference(logits, 4, renormalize)[0], **WEIGHT_TOLERANCE)
    torch.testing.assert_close(route(logits, 4, False)[0][1], torch.full((4,), 1 / 8, device=device))
    torch.testing.assert_close(route(logits, 4, True)[0][2], torch.full((4,), 1 / 4, device=device))
    # one row alone (a program of one token) and many copies (a block of tokens) rank alike
    assert route(logits[:1], 4)[1].tolist() == [[1, 3, 7, 2]]
    assert (route(logits[:1].expand(37, 8), 5)[1] == torch.tensor([1, 3, 7, 2, 4], device=device)).all()


def test_masked_experts_come_last_with_weight_zero(device, triton_path):
    """A -inf logit is never taken while a finite one is open; past the finite ones, the lowest masked index."""
    inf = float("inf")
    logits = torch.tensor([[-inf, 0.5, -inf, 0.25, -inf, -inf], [0.0, -inf, -inf, -inf, -inf, 1.0]], device=device)
    weights, ids = route(logits, 4, renormalize=True)
    assert ids.tolist() == [[1, 3, 0, 2], [5, 0, 1, 2]]
    assert (weights[:, 2:] == 0).all()
    torch.testing.assert_close(weights, reference(logits, 4, True)[0], **WEIGHT_TOLERANCE)


def test_a_nan_logit_makes_its_row_nan_and_its_ids_stay_distinct(device, triton_path):
    logits = torch.randn(3, 16, device=device)
    logits[1, 9] = float("nan")
    weights, ids = route(logits, 4, renormalize=False)
    assert weights[1].isnan().all() and not weights[[0, 2]].isnan().any()
    assert ids[1, 0] == 9 and len(set(ids[1].tolist())) == 4 and ids.min() >= 0 and ids.max() < 16
    torch.testing.assert_close(weights[[0, 2]], reference(logits[[0, 2]], 4, False)[0], **WEIGHT_TOLERANCE)


@pytest.mark.parametrize(("num_experts", "top_k"), [(256, 8), (MAX_EXPERTS, MAX_TOP_K), (5, 5), (1, 1), (2, 2)])
def test_bounds_and_every_expert_taken(num_experts, top_k, device, triton_path):
    """DeepSeek's 256 experts, the kernel's largest row and top_k, top_k == num_experts (ids a permutation)."""
    logits = torch.randn(3, num_experts, generator=torch.Generator().manual_seed(num_experts)).to(device)
    check_route(logits, top_k, renormalize=True)
    check_route(logits, top_k, renormalize=False)
    if top_k == num_experts:
        assert (route(logits, top_k)[1].sort(-1).values == torch.arange(num_experts, device=device)).all()


def test_strided_rows_and_no_tokens(device, triton_path):
    wide = torch.randn(9, 100, device=device)
    logits = wide[:, 10:74]  # rows 100 apart, each contiguous
    assert route_supported(logits, 4)
    check_route(logits, 4, renormalize=True)
    weights, ids = route(wide[:0, :64], 4)
    assert weights.shape == ids.shape == (0, 4)


def test_unsupported_shapes_raise_in_route():
    assert not route_supported(torch.zeros(2, MAX_EXPERTS + 1), 2)
    assert not route_supported(torch.zeros(2, 8), 9) and not route_supported(torch.zeros(2, 8), 0)
    assert not route_supported(torch.zeros(2, 64), MAX_TOP_K + 1)
    assert not route_supported(torch.zeros(8, 2).t(), 1)  # rows not contiguous
    assert not route_supported(torch.zeros(2, 8, dtype=torch.int32), 1)
    with pytest.raises(ValueError, match="top_k 9 of 8 experts"):
        route(torch.zeros(2, 8), 9)


def test_select_experts_takes_the_kernel_when_it_can(device, triton_path, monkeypatch):
    calls = []
    monkeypatch.setattr(moe_layer, "route", lambda *a: calls.append(a) or route(*a))
    logits = torch.randn(5, 64, device=device, dtype=torch.bfloat16)
    weights, ids = select_experts(logits, 8, renormalize=False)
    assert len(calls) == 1
    torch.testing.assert_close(weights, reference(logits, 8, False)[0], **WEIGHT_TOLERANCE)
    assert torch.equal(ids, reference(logits, 8, False)[1])
    # past the kernel's bounds, and rows not contiguous: the torch path, same semantics
    for logits, top_k in ((torch.randn(3, MAX_EXPERTS + 8, device=device), 4),
                          (torch.randn(3, 40, device=device), MAX_TOP_K + 1),
                          (torch.randn(16, 3, device=device).t(), 2)):
        weights, ids = select_experts(logits, top_k)
        assert len(calls) == 1
        torch.testing.assert_close(weights, route_ref(logits, top_k)[0], atol=0, rtol=0)


def test_select_experts_off_the_gpu_is_the_torch_path(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CPU tensors with a GPU present: covered by the forced runs")
    monkeypatch.setattr(moe_layer, "route", None)  # never called: no force_triton here
    logits = torch.randn(4, 8)
    for got, want in zip(select_experts(logits, 2), route_ref(logits, 2)):
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k"), [
    (1, 128, 8), (1, 8, 2), (1, 60, 4), (7, 256, 8), (300, 128, 8), (4099, 64, 6), (33, 512, 10),
    (5, MAX_EXPERTS, MAX_TOP_K),
])
def test_route_gpu(num_tokens, num_experts, top_k, cuda):
    """The compiled kernel (one program a token, one warp) at the models' shapes: Qwen3-30B-A3B (128, 8),
    Mixtral (8, 2), Qwen1.5-MoE (60, 4), DeepSeek-V3 (256, 8), Qwen3-Next (512, 10), a prefill's tokens."""
    torch.manual_seed(num_tokens + num_experts)
    for dtype in DTYPES:
        logits = 2 * torch.randn(num_tokens, num_experts, device=cuda, dtype=dtype)
        for renormalize in (True, False):
            check_route(logits, top_k, renormalize)
        # select_experts takes the kernel on CUDA unforced: its ids follow the tie rule exactly
        assert torch.equal(select_experts(logits, top_k)[1], reference(logits, top_k, True)[1])


@pytest.mark.gpu
@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k", "renormalize"),
                         [(1, 128, 8, True), (8, 8, 2, True), (3, 60, 4, False)])
def test_route_gpu_captures_in_a_cuda_graph_and_replays_new_logits(num_tokens, num_experts, top_k, renormalize,
                                                                    cuda):
    """No host sync inside: select_experts captures, and each replay routes whatever logits the buffer holds."""
    logits = torch.randn(num_tokens, num_experts, device=cuda, dtype=torch.bfloat16)
    select_experts(logits, top_k, renormalize)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, ids = select_experts(logits, top_k, renormalize)
    for seed in range(3):
        torch.manual_seed(seed)
        logits.copy_(3 * torch.randn_like(logits))
        graph.replay()
        ref_weights, ref_ids = reference(logits, top_k, renormalize)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(weights, ref_weights, **WEIGHT_TOLERANCE)
