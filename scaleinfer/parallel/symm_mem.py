"""Small all-reduces on torch's symmetric memory: every rank's buffer is mapped into every peer's address space,
and one kernel (torch.ops.symm_mem.one_shot_all_reduce_out) reads all of them and sums, in a CUDA graph too.
For the [batch, hidden] partial sums of a decode step this takes a few microseconds where NCCL takes tens
(2 H200s, 8 KB: 6.4 us against 24 us). NVLink multicast stays off (config.disable_nvlink_multicast)."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

MAX_BYTES = 256 << 10  # one-shot reads every peer's whole message: past this NCCL's ring is as fast


class SmallAllReduce:
    def __init__(self, buffer: torch.Tensor, group_name: str) -> None:
        self.buffer = buffer  # [MAX_BYTES // itemsize], symmetric over the group
        self.group_name = group_name

    @classmethod
    def create(cls, device: torch.device, group: dist.ProcessGroup,
               dtype: torch.dtype = torch.bfloat16) -> SmallAllReduce | None:
        """Collective over `group`. None where symmetric memory does not serve (no peer access, old torch)."""
        try:
            import torch.distributed._symmetric_memory as symm_mem

            buffer = symm_mem.empty(MAX_BYTES // dtype.itemsize, dtype=dtype, device=device)
            handle = symm_mem.rendezvous(buffer, group.group_name)
        except Exception as exc:  # any failure here leaves NCCL in charge, which is correct, only slower
            logger.info("symmetric-memory all-reduce unavailable (%s); NCCL runs every all-reduce", exc)
            return None
        return cls(buffer, group.group_name) if handle is not None else None

    def fits(self, x: torch.Tensor) -> bool:
        return x.is_cuda and x.dtype == self.buffer.dtype and x.is_contiguous() and x.numel() <= self.buffer.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        staged = self.buffer[: x.numel()]
        staged.copy_(x.view(-1))
        out = torch.empty_like(x)
        torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", self.group_name, out.view(-1))
        return out
