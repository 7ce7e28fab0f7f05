"""Token-expert pairs grouped by expert, each group padded to a multiple of block_m: the row order of the
fused MoE GEMM (kernels/moe.py), whose programs each take one block of block_m rows of a single expert.

A pair is one (token, slot) of the router's choice, numbered token * top_k + slot; a negative expert id
marks a pair no expert takes (the unused rows of the expert-parallel all-to-all): it gets no row, and the
GEMM never writes its output. Everything is computed
with torch ops on the device at sizes fixed by (num_pairs, num_experts, block_m): no host sync and no
data-dependent shape, so a decode step that routes tokens can be captured in a CUDA graph. The price is
an upper bound on the padded rows (num_pairs + num_experts * (block_m - 1)); the GEMM's programs past the
rows in use exit at once.

The Triton kernel is one program (two launches with the fill) where the torch reference takes some twenty
small ones: in a decode step of a 32-layer model that is most of the routing's cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scaleinfer.kernels.checks import INDEX_DTYPES, check_contiguous, check_dtype, check_shape
from scaleinfer.kernels.dispatch import tl, triton, use_triton

# The align program takes pairs (or blocks) BLOCK at a time, BLOCK * experts one-hot entries in registers.
MAX_BLOCK, MAX_ONE_HOT = 1024, 8192


@dataclass(slots=True)
class MoEAlignment:
    sorted_pair_ids: torch.Tensor  # [max_rows] int32: each row's pair; padding rows hold num_pairs
    block_expert_ids: torch.Tensor  # [max_rows // block_m] int32: the expert of each block of rows
    num_rows: torch.Tensor  # [1] int32: rows in use, a multiple of block_m; blocks from there on are idle
    num_pairs: int
    block_m: int

    @property
    def max_blocks(self) -> int:
        return self.block_expert_ids.shape[0]


def max_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The most rows the padded groups can take: every expert's group may waste block_m - 1 rows."""
    bound = num_pairs + num_experts * (block_m - 1)
    return -(-bound // block_m) * block_m


def align_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    """topk_ids: [num_tokens, top_k], expert ids in [0, num_experts) -> the pairs grouped by expert in pair
    order, each group starting at a multiple of block_m."""
    check_shape("topk_ids", topk_ids, [None, None])
    check_dtype("topk_ids", topk_ids, INDEX_DTYPES)
    if use_triton(topk_ids):
        return align_pairs_triton(topk_ids, num_experts, block_m)
    return align_pairs_ref(topk_ids, num_experts, block_m)


def align_pairs_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    device, num_pairs = topk_ids.device, topk_ids.numel()
    ids = topk_ids.flatten().long()  # [num_pairs]
    valid = ids >= 0
    expert_of_pair = ids.clamp_min(0)
    # A one-hot table rather than a sort: its cumulative sum ranks each pair within its expert, and every
    # op on it has a shape known in advance. [num_pairs, num_experts] is small for Mixtral's 8 experts.
    one_hot = ids[:, None] == torch.arange(num_experts, device=device)  # [num_pairs, num_experts]
    counts = one_hot.sum(0)  # [num_experts]
    rank = one_hot.cumsum(0).gather(1, expert_of_pair[:, None]).squeeze(1) - 1  # [num_pairs]
    padded_counts = (counts + block_m - 1) // block_m * block_m
    padded_ends = padded_counts.cumsum(0)  # [num_experts]
    total = max_rows(num_pairs, num_experts, block_m)
    rows = padded_ends[expert_of_pair] - padded_counts[expert_of_pair] + rank  # [num_pairs]
    rows = torch.where(valid, rows, total)  # pairs of no expert: a spare row past the end, dropped
    sorted_pair_ids = torch.full((total + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids.scatter_(0, rows, torch.arange(num_pairs, dtype=torch.int32, device=device))
    sorted_pair_ids = sorted_pair_ids[:total]
    block_starts = torch.arange(0, total, block_m, device=device)  # [max_blocks]
    # A block's expert: how many groups end at or before its first row (idle blocks get num_experts: clamped).
    block_expert_ids = (block_starts[:, None] >= padded_ends[None, :]).sum(1).clamp_max(num_experts - 1)
    return MoEAlignment(
        sorted_pair_ids, block_expert_ids.to(torch.int32), padded_ends[-1:].to(torch.int32), num_pairs, block_m
    )


def align_pairs_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    check_contiguous("topk_ids", topk_ids)
    device, num_pairs = topk_ids.device, topk_ids.numel()
    total = max_rows(num_pairs, num_experts, block_m)
    sorted_pair_ids = torch.full((total,), num_pairs, dtype=torch.int32, device=device)
    block_expert_ids = torch.empty(total // block_m, dtype=torch.int32, device=device)
    num_rows = torch.empty(1, dtype=torch.int32, device=device)
    block_e = triton.next_power_of_2(num_experts)
    _align_kernel[(1,)](
        topk_ids,
        sorted_pair_ids,
        block_expert_ids,
        num_rows,
        num_pairs,
        total // block_m,
        num_experts,
        block_m,
        BLOCK=max(16, min(MAX_BLOCK, MAX_ONE_HOT // block_e)),
        BLOCK_E=block_e,
        num_warps=8,
    )
    return MoEAlignment(sorted_pair_ids, block_expert_ids, num_rows, num_pairs, block_m)


@triton.jit(do_not_specialize=["num_pairs", "num_blocks"])  # they change every step: one compiled variant
def _align_kernel(
    ids_ptr,
    sorted_ptr,
    block_expert_ptr,
    num_rows_ptr,
    num_pairs,
    num_blocks,
    num_experts,
    block_m,
    BLOCK: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    experts = tl.arange(0, BLOCK_E)
    offs = tl.arange(0, BLOCK)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for start in range(0, num_pairs, BLOCK):  # pass 1: pairs per expert
        ids = tl.load(ids_ptr + start + offs, mask=start + offs < num_pairs, other=-1)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = tl.cumsum(padded, axis=0)  # [BLOCK_E]: one past each expert's last row
    next_row = ends - padded  # [BLOCK_E]: each expert's next free row
    for start in range(0, num_pairs, BLOCK):  # pass 2: each pair to its row, in pair order within its expert
        pairs = start + offs
        ids = tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=-1)
        one_hot = (ids[:, None] == experts[None, :]).to(tl.int32)  # [BLOCK, BLOCK_E]
        rows = tl.sum((tl.cumsum(one_hot, axis=0) - 1 + next_row[None, :]) * one_hot, axis=1)  # [BLOCK]
        tl.store(sorted_ptr + rows, pairs, mask=(pairs < num_pairs) & (ids >= 0))
        next_row += tl.sum(one_hot, axis=0)
    tl.store(num_rows_ptr, tl.sum(padded, axis=0))
    for start in range(0, num_blocks, BLOCK):  # each block's expert: the groups ending at or before its first row
        blocks = start + offs
        expert = tl.sum((blocks[:, None] * block_m >= ends[None, :]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + blocks, tl.minimum(expert, num_experts - 1), mask=blocks < num_blocks)
