"""The MoE all-to-all: tokens to the ranks holding their experts and back, plain or coordinated (the paper's PCC).

Every rank of a stage holds the same N tokens after attention's all-reduce. Each token is handled by one
owner per EP group (parallel/expert.py: E ranks, one per expert group, each holding slice s of its experts):

- plain: the E expert groups each own N / E tokens; all S ranks of group e send its N / E, each through its
  own EP group; the S partial sums are all-reduced in the slice group, then an all-gather over the EP group
  restores the N.
- coordinated: every rank owns its N / (E * S) share; it goes once through the rank's EP group, the tokens
  received are all-gathered in the slice group (each slice needs every token routed to its experts), the
  partial sums reduce-scattered back, and one all-gather over the stage restores the N. The all-to-all
  bytes per rank are S times fewer.

No host sync: each peer's part of the exchange is a fixed capacity of rows (owned tokens x min(top_k, local
experts), the most one token can send to one peer), so all_to_all_single runs with equal splits and a decode
step captures in a CUDA graph. Unused rows carry expert id -1: the expert kernel skips them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from scaleinfer.parallel.expert import ExpertParallelState

# (hidden rows [R, H], local expert id per row [R, 1], -1: none) -> this rank's slice of the expert outputs [R, H]
ExpertsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(slots=True)
class CommTally:
    """Bytes this rank put on and took off the wire (its own part of a collective excluded), and the calls."""

    sent: int = 0
    received: int = 0
    calls: int = 0


# torch 2.13 renamed the tensor collectives (the old names warn); 2.11 has only the old ones.
_all_gather_tensor = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)

# op -> tally, counted on the host from the shapes at each eager call (a replayed CUDA graph counts nothing).
COMM_BYTES: dict[str, CommTally] = {}


def reset_comm_bytes() -> None:
    COMM_BYTES.clear()


def comm_bytes() -> dict[str, CommTally]:
    """A copy of the tallies so far (the live ones keep counting)."""
    return {op: CommTally(t.sent, t.received, t.calls) for op, t in COMM_BYTES.items()}


def _count(op: str, sent: int, received: int) -> None:
    tally = COMM_BYTES.setdefault(op, CommTally())
    tally.sent, tally.received, tally.calls = tally.sent + sent, tally.received + received, tally.calls + 1


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def all_to_all(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """x: [size * C, ...], block p to peer p -> [size * C, ...], block p from peer p."""
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x.contiguous(), group=group)
    moved = _nbytes(x) * (size - 1) // size
    _count("all_to_all", moved, moved)
    return out


def all_gather_rows(x: torch.Tensor, group, size: int, op: str) -> torch.Tensor:
    """x: [n, ...] -> [size * n, ...], rank p's rows at p * n."""
    out = x.new_empty((size * x.shape[0], *x.shape[1:]))
    _all_gather_tensor(out, x.contiguous(), group=group)
    _count(op, _nbytes(x) * (size - 1), _nbytes(x) * (size - 1))
    return out


def reduce_scatter_rows(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """x: [size * n, ...] -> this rank's [n, ...] of the sum over the group."""
    out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
    _reduce_scatter_tensor(out, x.contiguous(), group=group)
    moved = _nbytes(x) * (size - 1) // size
    _count("slice_reduce_scatter", moved, moved)
    return out


def all_reduce(x: torch.Tensor, group, size: int) -> torch.Tensor:
    dist.all_reduce(x, group=group)
    moved = 2 * _nbytes(x) * (size - 1) // size
    _count("slice_all_reduce", moved, moved)
    return x


@dataclass(slots=True, frozen=True)
class Dispatch:
    """Where this rank's owned pairs went: pair p (token p // top_k) sits in send row rows[p] (num_rows: none)."""

    rows: torch.Tensor  # [n * top_k] int64
    capacity: int  # rows per peer


def moe_all_to_all(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_local_experts: int,
                   ep: ExpertParallelState, stage_group, experts: ExpertsFn) -> torch.Tensor:
    """x: [N, H] (the same on every rank of the stage); topk_weights, topk_ids: [N, top_k], global expert ids ->
    [N, H], every token's weighted sum over its experts, on every rank."""
    num_owners = ep.stage_size if ep.coordinated else ep.ep_size
    owner = ep.stage_rank if ep.coordinated else ep.ep_rank
    n = -(-x.shape[0] // num_owners)
    own = slice(owner * n, (owner + 1) * n)
    xo, wo, ido = (_pad_rows(t, n * num_owners, fill)[own] for t, fill in ((x, 0), (topk_weights, 0), (topk_ids, -1)))
    send_x, send_ids, dispatch = _pack(xo, ido, num_local_experts, ep.ep_size)
    rows_x, rows_ids = (all_to_all(t, ep.ep_group, ep.ep_size) for t in (send_x, send_ids))
    if ep.coordinated and ep.slice_size > 1:
        rows_x = all_gather_rows(rows_x, ep.slice_group, ep.slice_size, "slice_all_gather")
        rows_ids = all_gather_rows(rows_ids, ep.slice_group, ep.slice_size, "slice_all_gather")
    out = experts(rows_x, rows_ids[:, None])
    out = torch.where(rows_ids[:, None] >= 0, out, 0)  # rows no pair used: the kernel left them unwritten
    if ep.coordinated and ep.slice_size > 1:
        out = reduce_scatter_rows(out, ep.slice_group, ep.slice_size)
    combined = _combine(all_to_all(out, ep.ep_group, ep.ep_size), dispatch, wo, x.dtype)  # [n, H]
    if not ep.coordinated and ep.slice_size > 1:
        combined = all_reduce(combined, ep.slice_group, ep.slice_size)
    group, size = (stage_group, ep.stage_size) if ep.coordinated else (ep.ep_group, ep.ep_size)
    return all_gather_rows(combined, group, size, "restore_all_gather")[: x.shape[0]]


def _pad_rows(t: torch.Tensor, rows: int, fill: float) -> torch.Tensor:
    return F.pad(t, (0, 0, 0, rows - t.shape[0]), value=fill) if rows > t.shape[0] else t


def _pack(x: torch.Tensor, topk_ids: torch.Tensor, num_local_experts: int,
          ep_size: int) -> tuple[torch.Tensor, torch.Tensor, Dispatch]:
    """x: [n, H], topk_ids: [n, top_k] -> (send rows [ep_size * C, H], their local expert ids [ep_size * C]
    int32, -1 where unused; the dispatch). Peer d's block holds the pairs routed to its experts, in pair order."""
    n, top_k = topk_ids.shape
    capacity = n * min(top_k, num_local_experts)
    ids = topk_ids.flatten().long()  # [n * top_k]
    valid = ids >= 0
    dest = torch.where(valid, ids // num_local_experts, ep_size)  # padding pairs to a peer past the last
    one_hot = dest[:, None] == torch.arange(ep_size, device=x.device)  # [n * top_k, ep_size]
    slot = one_hot.cumsum(0).gather(1, dest.clamp_max(ep_size - 1)[:, None]).squeeze(1) - 1
    num_rows = ep_size * capacity
    rows = torch.where(valid, dest * capacity + slot, num_rows)  # one spare row takes the padding pairs
    send_x = x.new_zeros(num_rows + 1, x.shape[1])
    send_x[rows] = x.repeat_interleave(top_k, dim=0)
    send_ids = torch.full((num_rows + 1,), -1, dtype=torch.int32, device=x.device)
    send_ids[rows] = (ids % num_local_experts).to(torch.int32)
    return send_x[:num_rows], send_ids[:num_rows], Dispatch(rows, capacity)


def _combine(back: torch.Tensor, dispatch: Dispatch, topk_weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """back: [ep_size * C, H], each send row's expert output returned -> [n, H], the weighted sum per token."""
    n, top_k = topk_weights.shape
    padded = torch.cat([back, back.new_zeros(1, back.shape[1])])  # the spare row: padding pairs read zeros
    pairs = padded[dispatch.rows].float() * topk_weights.reshape(-1, 1).float()  # [n * top_k, H]
    return pairs.view(n, top_k, -1).sum(1).to(dtype)
