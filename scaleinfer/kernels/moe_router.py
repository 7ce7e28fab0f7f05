"""The MoE router's top-k choice in one launch: softmax in float32, the top_k experts, renormalized or not.

The torch path (route_ref: a float32 cast, torch.softmax, torch.topk, the sum and the divide) is about six
kernels a MoE layer, ~12-14 us at Qwen3-30B-A3B's batch-1 decode on an H200 against ~31 us for the experts
themselves. Here one program takes ROWS tokens with each token's whole expert row in registers (num_experts
padded to a power of two, at most MAX_EXPERTS):

    p = softmax(float32(logits))                      as torch: exp(x - max) / sum
    k passes: the largest logit not yet taken -> (p of it, its expert index), then that expert is masked
    renormalize: the k probabilities divided by their sum (HF Mixtral; Qwen-MoE with norm_topk_prob)

The order is that of the float32 logits (exp is monotonic, so it is the probabilities' order wherever they
differ). Ties: among equal logits the lowest expert index comes first, in the ids and in which experts make
the cut (torch.topk leaves the order of ties unspecified). A -inf logit (a masked expert) is taken only when
fewer than top_k are finite, with weight 0. A NaN logit ranks above every number, as in torch.topk, and
makes the row's weights NaN, as torch.softmax does; the ids stay distinct experts of the row.

Sizes are read from the tensors' shapes, nothing from their values: no host sync, and a CUDA graph replays
the launch with whatever logits are in the captured buffer.
"""

from __future__ import annotations

import torch

from scaleinfer.kernels.checks import FLOAT_DTYPES, check_dtype, check_last_dim_contiguous, check_shape
from scaleinfer.kernels.dispatch import tl, triton

# The kernel's bounds (route_supported): past them select_experts takes the torch path. 1024 experts padded are
# 32 float32 registers a thread at 1 warp of 32 lanes for 1024 (bench/compile_moe_router.py: no spills); top_k
# is unrolled pass by pass.
MAX_EXPERTS = 1024
MAX_TOP_K = 32
# Tokens a program on the GPU: one (batch-1 decode is the case that matters; a program per token keeps the
# grid wide at prefill too). Under the interpreter a program is a few numpy calls whatever its size, so it
# takes a block of tokens (and the tests cover ROWS > 1).
GPU_ROWS = 1
INTERPRETER_ROWS = 16


def route_supported(router_logits: torch.Tensor, top_k: int) -> bool:
    """Whether route() takes these logits: [num_tokens, num_experts] floats, each row contiguous,
    num_experts <= MAX_EXPERTS, 1 <= top_k <= min(num_experts, MAX_TOP_K)."""
    if router_logits.dim() != 2 or router_logits.dtype not in FLOAT_DTYPES:
        return False
    num_experts = router_logits.shape[1]
    if num_experts > 1 and router_logits.stride(1) != 1:
        return False
    return num_experts <= MAX_EXPERTS and 1 <= top_k <= min(num_experts, MAX_TOP_K)


def route_ref(router_logits: torch.Tensor, top_k: int,
              renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch path: (topk_weights [num_tokens, top_k] float32, topk_ids [num_tokens, top_k] int64)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids


def route(router_logits: torch.Tensor, top_k: int,
          renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [num_tokens, num_experts] (float32, bfloat16 or float16; rows by stride, each row
    contiguous) -> (topk_weights [num_tokens, top_k] float32, topk_ids [num_tokens, top_k] int64), weights in
    descending order; one launch. The dtypes are route_ref's (select_experts' callers take either)."""
    check_shape("router_logits", router_logits, [None, None])
    check_dtype("router_logits", router_logits, FLOAT_DTYPES)
    check_last_dim_contiguous("router_logits", router_logits)
    num_tokens, num_experts = router_logits.shape
    if not route_supported(router_logits, top_k):
        raise ValueError(f"top_k {top_k} of {num_experts} experts: the router kernel takes 1 <= top_k <= "
                         f"min(num_experts, {MAX_TOP_K}) and num_experts <= {MAX_EXPERTS}")
    device = router_logits.device
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=device)
    if num_tokens == 0:
        return weights, ids
    rows = GPU_ROWS if router_logits.is_cuda else INTERPRETER_ROWS
    rows = min(rows, triton.next_power_of_2(num_tokens))
    block = triton.next_power_of_2(num_experts)
    # A warp a token row (up to 4): a row's k passes of reductions stay within its warp (shuffles, no shared
    # memory, no barrier); a lane holds block / 32 experts, 32 at most.
    _router_kernel[(triton.cdiv(num_tokens, rows),)](
        router_logits, weights, ids, num_tokens, num_experts, router_logits.stride(0),
        TOP_K=top_k, RENORMALIZE=bool(renormalize), ROWS=rows, BLOCK=block, BLOCK_K=triton.next_power_of_2(top_k),
        num_warps=min(rows, 4),
    )
    return weights, ids


@triton.jit
def _router_kernel(
    logits_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, stride_t,
    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # ROWS tokens a program, each token's whole row of experts in registers (BLOCK >= num_experts).
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    x = tl.load(logits_ptr + rows[:, None] * stride_t + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                other=0.0).to(tl.float32)
    x = tl.where(col_ok[None, :], x, float("-inf"))  # padded experts add exp(-inf) = 0
    # softmax as torch computes it: exp(x - max) / sum (a NaN or +inf logit makes the whole row NaN)
    row_max = tl.max(x, axis=1)
    denom = tl.sum(tl.exp(x - row_max[:, None]), axis=1)
    # The ranking key: the logit, NaN above every number (torch.topk's order), -inf raised to the lowest
    # finite float so that taken and padded experts (-inf) rank below every expert of the row still open.
    key = tl.where(x != x, float("inf"), tl.maximum(x, -3.4028234663852886e38))
    key = tl.where(col_ok[None, :], key, float("-inf"))
    kcols = tl.arange(0, BLOCK_K)
    top_w = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)
    top_i = tl.zeros((ROWS, BLOCK_K), dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        # the largest key open and, among equal keys, the lowest expert index
        best, idx = tl.max(key, axis=1, return_indices=True, return_indices_tie_break_left=True)
        p = tl.exp(best - row_max) / denom  # NaN for a row with a NaN: denom is
        top_w = tl.where(kcols[None, :] == k, p[:, None], top_w)
        top_i = tl.where(kcols[None, :] == k, idx[:, None], top_i)
        key = tl.where(cols[None, :] == idx[:, None], float("-inf"), key)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=1)[:, None]  # the unused BLOCK_K slots hold 0
    out = rows[:, None] * TOP_K + kcols[None, :]
    out_ok = row_ok[:, None] & (kcols[None, :] < TOP_K)
    tl.store(weights_ptr + out, top_w, mask=out_ok)
    tl.store(ids_ptr + out, top_i.to(tl.int64), mask=out_ok)
