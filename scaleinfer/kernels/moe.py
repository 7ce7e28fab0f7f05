"""Fused mixture-of-experts MLP: every token through its top_k experts' gated-SiLU MLPs, weighted and summed.

    out[t] = sum_j weight[t, j] * w2[e_j] @ silu_and_mul(w13[e_j] @ x[t]),  e_j = topk_ids[t, j]

The Triton path is two launches of one grouped GEMM over the token-expert pairs, grouped by expert and
padded per expert to BLOCK_M rows (kernels/moe_align.py): each program takes one BLOCK_M block of pairs,
all of one expert, and one BLOCK_N tile of outputs; it gathers the pairs' input rows, multiplies them by
that expert's weight tile and writes one output row per pair. GEMM 1 (w13, rows gathered by token) ->
silu_and_mul -> GEMM 2 (w2, rows by pair, times the routing weight) -> sum over the top_k rows of a token.
Nothing reads a device value on the host, so a decode step captures in a CUDA graph. At a few tokens
(num_tokens * top_k <= MAX_DECODE_PAIRS) the call takes kernels/moe_decode.py's GEMV over the chosen experts
instead: a function of the shapes alone, so each captured graph keeps its path.

The reference loops over the experts with data-dependent gathers, as HF's MixtralExperts does: the CPU path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scaleinfer.kernels.activation import silu_and_mul, silu_and_mul_ref
from scaleinfer.kernels.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_contiguous,
    check_device,
    check_dtype,
    check_last_dim_contiguous,
    check_same_dtype,
    check_shape,
)
from scaleinfer.kernels.dispatch import dot_args, mma, tl, triton, use_triton
from scaleinfer.kernels.moe_align import MoEAlignment, align_pairs
from scaleinfer.kernels.moe_decode import fused_moe_decode, use_decode_path


@dataclass(slots=True, frozen=True)
class MoETiles:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


# Unmeasured starting points (vLLM's defaults are of this kind); bench/ should sweep them on the card.
DECODE_TILES = MoETiles(16, 64, 128)  # few pairs per expert: narrow blocks, many N tiles to fill the card
PREFILL_TILES = MoETiles(64, 128, 64)
INTERPRETER_TILES = MoETiles(16, 32, 32)  # tl.dot needs 16 per dimension; small keeps the interpreter quick


def fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """x: [num_tokens, hidden]; w13: [num_experts, 2 * inter, hidden] (gate rows then up rows);
    w2: [num_experts, hidden, inter]; topk_weights, topk_ids: [num_tokens, top_k] -> [num_tokens, hidden]
    in x's dtype."""
    if use_triton(x):
        return fused_moe_triton(x, w13, w2, topk_weights, topk_ids)
    return fused_moe_ref(x, w13, w2, topk_weights, topk_ids)


def fused_moe_ref(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    out = torch.zeros_like(x)  # [num_tokens, hidden]
    for expert in range(w13.shape[0]):
        token_ids, slots = torch.where(topk_ids == expert)  # [n] each: the pairs routed to this expert
        down = F.linear(silu_and_mul_ref(F.linear(x[token_ids], w13[expert])), w2[expert])  # [n, hidden]
        out.index_add_(0, token_ids, (down * topk_weights[token_ids, slots, None]).to(x.dtype))
    return out


def fused_moe_triton(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    _check(x, w13, w2, topk_weights, topk_ids)
    num_tokens, top_k = topk_ids.shape
    if use_decode_path(num_tokens, top_k):
        return fused_moe_decode(x, w13, w2, topk_weights, topk_ids)
    return fused_moe_grouped(x, w13, w2, topk_weights, topk_ids)


def fused_moe_grouped(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """The grouped-GEMM path at any token count (fused_moe_triton takes it above the decode bound)."""
    num_tokens, top_k = topk_ids.shape
    tiles = moe_tiles(x, num_tokens * top_k, w13.shape[0])
    align = align_pairs(topk_ids, w13.shape[0], tiles.block_m)
    gate_up = grouped_gemm(x, w13, align, top_k, tiles)  # [num_pairs, 2 * inter]
    down = grouped_gemm(silu_and_mul(gate_up), w2, align, 1, tiles, topk_weights)  # [num_pairs, hidden]
    return down.view(num_tokens, top_k, w2.shape[1]).sum(1)


def moe_tiles(x: torch.Tensor, num_pairs: int, num_experts: int) -> MoETiles:
    """The tiles for a call; a function of the shapes alone, so each captured graph keeps its own."""
    if not x.is_cuda:
        return INTERPRETER_TILES
    return DECODE_TILES if num_pairs <= num_experts * DECODE_TILES.block_m else PREFILL_TILES


def grouped_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    align: MoEAlignment,
    pairs_per_a_row: int,
    tiles: MoETiles,
    topk_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """a: [num_pairs // pairs_per_a_row, K]; w: [num_experts, N, K] -> [num_pairs, N], row p = w[e_p] @ a[p //
    pairs_per_a_row], times topk_weights.flatten()[p] when given."""
    num_n = w.shape[1]
    c = torch.empty(align.num_pairs, num_n, dtype=a.dtype, device=a.device)
    weights = topk_weights if topk_weights is not None else c  # unread when MUL_WEIGHT is off
    # Rows in use are a prefix of at most num_pairs blocks (each holds a pair): with many experts and few tokens
    # (decode) that is far below max_blocks, whose extra programs would only start and exit.
    grid = (max(1, min(align.max_blocks, align.num_pairs)), triton.cdiv(num_n, tiles.block_n))
    _grouped_gemm_kernel[grid](
        a,
        w,
        c,
        weights,
        align.sorted_pair_ids,
        align.block_expert_ids,
        align.num_rows,
        align.num_pairs,
        num_n,
        w.shape[2],
        a.stride(0),
        w.stride(0),
        w.stride(1),
        c.stride(0),
        PAIRS_PER_A_ROW=pairs_per_a_row,
        MUL_WEIGHT=topk_weights is not None,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        **dot_args(a),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return c


def _check(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> None:
    check_shape("x", x, [None, None])
    check_dtype("x", x, FLOAT_DTYPES)
    check_last_dim_contiguous("x", x)
    num_experts, hidden = w13.shape[0], x.shape[1]
    check_shape("w13", w13, [None, None, hidden])
    if w13.shape[1] % 2:
        raise ValueError(f"w13 has shape {list(w13.shape)}: its rows must be even (gate then up)")
    check_shape("w2", w2, [num_experts, hidden, w13.shape[1] // 2])
    check_shape("topk_ids", topk_ids, [x.shape[0], None])
    check_dtype("topk_ids", topk_ids, INDEX_DTYPES)
    check_shape("topk_weights", topk_weights, list(topk_ids.shape))
    check_dtype("topk_weights", topk_weights, FLOAT_DTYPES)
    for name, t in dict(w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids).items():
        check_contiguous(name, t)
    for name, t in dict(w13=w13, w2=w2).items():
        check_same_dtype(name, t, x)
    check_device(x.device, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids)


@triton.jit(do_not_specialize=["num_pairs"])  # it changes every step: one compiled variant
def _grouped_gemm_kernel(
    a_ptr,
    w_ptr,
    c_ptr,
    weights_ptr,
    pair_ids_ptr,
    block_expert_ptr,
    num_rows_ptr,
    num_pairs,
    N,
    K,
    stride_am,
    stride_we,
    stride_wn,
    stride_cm,
    PAIRS_PER_A_ROW: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    if block * BLOCK_M >= tl.load(num_rows_ptr):  # past the padded groups: the grid is sized for the worst case
        return
    pairs = tl.load(pair_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    valid = pairs < num_pairs  # padding rows of the expert's last block
    a_rows = (pairs // PAIRS_PER_A_ROW).to(tl.int64)
    expert = tl.load(block_expert_ptr + block).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & (cols < N)[None, :], other=0.0)
        acc += mma(a, w, UPCAST, PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if MUL_WEIGHT:
        acc *= tl.load(weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)[:, None]
    c_ptrs = c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + cols[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (cols < N)[None, :])
