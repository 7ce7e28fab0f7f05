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
    """The smallest of `value` over every rank, all stages' (the KV block count all of them can hold)."""
    state = get_parallel_state()
    if state.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=state.control_group)
    return int(tensor.item())


def send_to_next_stage(x: torch.Tensor) -> dist.Work:
    """Pipeline: x to this tp_rank's rank of the next stage, asynchronously; x stays untouched until the returned
    work completes (the caller holds both)."""
    state = get_parallel_state()
    return dist.isend(_sendable(x, state.pp_group), dst=state.rank + state.tp_size, group=state.pp_group)


def recv_from_previous_stage(x: torch.Tensor) -> torch.Tensor:
    """Pipeline: fill x from this tp_rank's rank of the previous stage (on a GPU the stream waits, not the host)."""
    state = get_parallel_state()
    staged = _sendable(x, state.pp_group)
    dist.recv(staged, src=state.rank - state.tp_size, group=state.pp_group)
    return x if staged is x else x.copy_(staged)


def _sendable(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """x, or its host copy where the group is gloo's (ranks sharing one GPU): gloo moves host memory only."""
    return x.cpu() if x.is_cuda and dist.get_backend(group) == "gloo" else x
