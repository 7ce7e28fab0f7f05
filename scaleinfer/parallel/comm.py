"""The collectives the layers call, over this rank's tensor-parallel group.

Small all-reduces (a decode step's [batch, hidden] partial sums) go through torch's symmetric-memory one-shot
kernel on GPUs where it is set up (a few microseconds inside a CUDA graph, against tens for NCCL); everything
else through torch.distributed (NCCL on GPUs, gloo on CPUs). With one rank every call returns its input.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from scaleinfer.parallel.state import get_parallel_state


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of x over the tensor-parallel ranks (x may be reused as the output)."""
    state = get_parallel_state()
    if state.tp_size == 1:
        return x
    small = state.small_all_reduce
    if small is not None and small.fits(x):
        return small(x)
    dist.all_reduce(x, group=state.tp_group)
    return x


def tp_all_gather(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, n] on every rank -> [num_tokens, tp_size * n], rank r's columns at r * n."""
    state = get_parallel_state()
    if state.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(state.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=state.tp_group)
    return torch.cat(parts, dim=-1)


def min_over_ranks(value: int) -> int:
    """The smallest of `value` over the tensor-parallel ranks (the KV block count all of them can hold)."""
    state = get_parallel_state()
    if state.tp_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=state.control_group)
    return int(tensor.item())
