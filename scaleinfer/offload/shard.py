"""Several GPUs stream one model together (the paper's PCIe aggregation): with torch.distributed initialized
over N processes, each keeps 1/N of every layer in its host memory, copies that shard over its own PCIe link,
and the N shards are all-gathered over NVLink, so each GPU receives the whole layer N times faster.

Each rank runs its own engine on its own requests (data parallelism); every rank must take part in every
layer's all-gather, so the ranks step in lockstep (a rank without work runs a one-token padding step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from scaleinfer.parallel.state import get_parallel_state


@dataclass(slots=True, frozen=True)
class Shard:
    rank: int
    world_size: int
    # The gathers have a group of their own: they may be issued from a reader thread while the main thread
    # runs the step's all-reduce, and collectives of one group must be issued in the same order everywhere.
    gather_group: dist.ProcessGroup | None = None

    def range_of(self, nbytes: int) -> tuple[int, int]:
        """(offset, size) of this rank's share of a layer buffer of nbytes (a multiple of world_size)."""
        size = nbytes // self.world_size
        return self.rank * size, size

    def all_gather(self, buffer: torch.Tensor) -> None:
        """buffer: [nbytes] uint8 holding this rank's share at its offset -> every rank's share everywhere."""
        offset, size = self.range_of(buffer.numel())
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.12
        gather(buffer, buffer[offset: offset + size], group=self.gather_group)

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether flag is True on any rank (one small all-reduce)."""
        backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        value = torch.tensor([int(flag)], device=backend_device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


def current_shard() -> Shard | None:
    """The default process group as a shard layout, when there is one of more than one process. Collective:
    every rank must call it (it makes the gather group). Tensor-parallel ranks stream their own slices alone."""
    if get_parallel_state().tp_size > 1:
        return None
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    world_size = dist.get_world_size()
    return Shard(dist.get_rank(), world_size, dist.new_group(list(range(world_size))))
