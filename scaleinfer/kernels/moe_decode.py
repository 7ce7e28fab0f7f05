"""The fused MoE at decode: a GEMV per token-expert pair over the experts chosen, no alignment pass.

At a few tokens each expert has one or two pairs, so kernels/moe.py's grouped GEMM spends its time on the
alignment launches, on BLOCK_M-row tl.dot tiles of which one row is used, and on programs over every
expert's blocks. Here, as in kernels/gemv.py, each program streams weight rows and keeps float32 partial
sums in registers; the expert of a pair is read from topk_ids on the device (no host sync: a CUDA graph
replays it with any routing):

    GEMM 1, grid (pair, inter tile): the pair's expert's gate and up rows of one tile of intermediate
        features dotted with x[token], silu(gate) * up in the epilogue -> act [num_pairs, inter]
    GEMM 2, grid (token, hidden tile): for each of the token's top_k pairs, w2[e] rows of the tile dotted
        with act[pair] times the routing weight, summed in the program -> out [num_tokens, hidden]

GEMM 2 sums a token's top_k pairs in one program in slot order: no atomics, no zeroed buffer, no third
launch, and the same result whatever the launch order. A negative expert id (the expert-parallel
all-to-all's unused rows) masks that pair's weight loads: it adds nothing, and a row of only such pairs is
zeros. Pair p is (token p // top_k, slot p % top_k), as in topk_ids.flatten().
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scaleinfer.kernels.dispatch import tl, triton

# The decode path's bound: at most this many token-expert pairs (num_tokens * top_k) a call. Above it the
# pairs per expert grow and the grouped GEMM's tl.dot tiles read each weight tile once for several pairs. On an
# H200 at Qwen3-30B-A3B's shape (bench/results/moe-qwen3-30b-a3b-h200-20261202-220405.json, GPU_CONFIG) the
# decode path took 37 / 48 us at 8 / 16 pairs against the grouped GEMM's 41 / 56, and 152 against 135 at 64.
MAX_DECODE_PAIRS = 32


@dataclass(slots=True, frozen=True)
class DecodeTiles:
    block_n: int  # output features per program
    block_k: int  # reduction step; capped at the reduction's next power of two
    num_warps: int = 4
    num_stages: int = 3


@dataclass(slots=True, frozen=True)
class MoEDecodeConfig:
    gate_up: DecodeTiles
    down: DecodeTiles


# Starting points, not swept (bench/moe_decode_tiles.py times others on the card): on the H200 (the result above)
# the two launches read Qwen3-30B-A3B's batch-1 experts at 47% of copy bandwidth, 16 pairs at 70%. GEMM 1 carries two
# [block_n, block_k] float32 tiles (gate and up), so half kernels/gemv.py's NARROW tile; GEMM 2's grid is only
# num_tokens * hidden / block_n programs, so narrow tiles to have more of them at batch 1.
GPU_CONFIG = MoEDecodeConfig(gate_up=DecodeTiles(8, 512), down=DecodeTiles(4, 512))
# Small tiles so the tests' tiny shapes take several programs and several K steps.
INTERPRETER_CONFIG = MoEDecodeConfig(gate_up=DecodeTiles(8, 32), down=DecodeTiles(16, 16))


def use_decode_path(num_tokens: int, top_k: int) -> bool:
    return num_tokens * top_k <= MAX_DECODE_PAIRS


def fused_moe_decode(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: MoEDecodeConfig | None = None,
) -> torch.Tensor:
    """fused_moe's contract (kernels/moe.py; the launcher there checks the arguments) for
    num_tokens * top_k <= MAX_DECODE_PAIRS: [num_tokens, hidden] in x's dtype."""
    config = config or (GPU_CONFIG if x.is_cuda else INTERPRETER_CONFIG)
    if topk_ids.numel() == 0:
        return torch.zeros_like(x)
    act = gate_up_gemv(x, w13, topk_ids, config.gate_up)  # [num_pairs, inter]
    return down_gemv(act, w2, topk_weights, topk_ids, config.down)


def gate_up_gemv(x: torch.Tensor, w13: torch.Tensor, topk_ids: torch.Tensor, tiles: DecodeTiles) -> torch.Tensor:
    """x: [num_tokens, hidden], w13: [num_experts, 2 * inter, hidden] -> silu_and_mul(w13[e_p] @ x[token(p)])
    for every pair p: [num_pairs, inter], zeros for a pair of negative expert id."""
    num_tokens, top_k = topk_ids.shape
    inter, hidden = w13.shape[1] // 2, w13.shape[2]
    act = torch.empty(num_tokens * top_k, inter, dtype=x.dtype, device=x.device)
    grid = (num_tokens * top_k, triton.cdiv(inter, tiles.block_n))  # pairs fastest: a tile's sharers run together
    _gate_up_kernel[grid](
        x, w13, topk_ids, act, inter, hidden, x.stride(0), w13.stride(0),
        TOP_K=top_k, BLOCK_N=tiles.block_n, BLOCK_K=_block_k(tiles, hidden),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return act


def down_gemv(
    act: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, tiles: DecodeTiles
) -> torch.Tensor:
    """act: [num_pairs, inter], w2: [num_experts, hidden, inter] -> out[t] = sum_j weight[t, j] * w2[e_tj] @
    act[t * top_k + j]: [num_tokens, hidden] in act's dtype."""
    num_tokens, top_k = topk_ids.shape
    hidden, inter = w2.shape[1], w2.shape[2]
    out = torch.empty(num_tokens, hidden, dtype=act.dtype, device=act.device)
    grid = (num_tokens, triton.cdiv(hidden, tiles.block_n))
    _down_kernel[grid](
        act, w2, topk_weights, topk_ids, out, hidden, inter, w2.stride(0),
        TOP_K=top_k, BLOCK_N=tiles.block_n, BLOCK_K=_block_k(tiles, inter),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out


def _block_k(tiles: DecodeTiles, k: int) -> int:
    return min(tiles.block_k, triton.next_power_of_2(k))


@triton.jit
def _gate_up_kernel(x_ptr, w13_ptr, ids_ptr, act_ptr, inter, hidden, stride_xm, stride_we, TOP_K: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pair = tl.program_id(0)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    features = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    feature_ok = features < inter
    rows_ok = features < tl.where(expert >= 0, inter, 0)  # no expert: weight loads masked, act silu(0) * 0 = 0
    gate_rows = w13_ptr + tl.maximum(expert, 0) * stride_we + features.to(tl.int64)[:, None] * hidden  # [BLOCK_N, 1]
    up_rows = gate_rows + inter * hidden  # the up row of the same intermediate feature
    x_row = x_ptr + (pair // TOP_K).to(tl.int64) * stride_xm
    gate = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(0, hidden, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        col_ok = cols < hidden
        xs = tl.load(x_row + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        mask = rows_ok[:, None] & col_ok[None, :]
        gate += tl.load(gate_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * xs
        up += tl.load(up_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * xs
    g = tl.sum(gate, axis=1)  # [BLOCK_N]
    act = g * tl.sigmoid(g) * tl.sum(up, axis=1)
    tl.store(act_ptr + pair.to(tl.int64) * inter + features, act.to(act_ptr.dtype.element_ty), mask=feature_ok)


@triton.jit
def _down_kernel(act_ptr, w2_ptr, weights_ptr, ids_ptr, out_ptr, hidden, inter, stride_we, TOP_K: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    features = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    feature_ok = features < hidden
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for slot in tl.static_range(TOP_K):  # the token's pairs in slot order: a fixed summation order
        pair = token * TOP_K + slot
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        weight = tl.load(weights_ptr + pair).to(tl.float32)
        rows = w2_ptr + tl.maximum(expert, 0) * stride_we + features.to(tl.int64)[:, None] * inter  # [BLOCK_N, 1]
        rows_ok = features < tl.where(expert >= 0, hidden, 0)  # no expert: this pair adds nothing
        act_row = act_ptr + pair * inter
        for start in range(0, inter, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)  # [BLOCK_K]
            col_ok = cols < inter
            a = tl.load(act_row + cols, mask=col_ok, other=0.0).to(tl.float32) * weight
            w = tl.load(rows + cols[None, :], mask=rows_ok[:, None] & col_ok[None, :], other=0.0)
            acc += w.to(tl.float32) * a[None, :]
    out = tl.sum(acc, axis=1)
    tl.store(out_ptr + token * hidden + features, out.to(out_ptr.dtype.element_ty), mask=feature_ok)
