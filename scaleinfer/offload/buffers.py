"""Host buffers for streamed layers: aligned for O_DIRECT, page-locked for asynchronous copies to the GPU.

Pinning goes through cudaHostRegister on our own allocation rather than torch's pinned allocator, which
rounds every request up to a power of two (a 1.7 GB layer would take 2 GB, a whole model nearly double).
"""

from __future__ import annotations

import torch

from scaleinfer.offload.layout import IO_ALIGN


def aligned_empty(nbytes: int) -> torch.Tensor:
    """[nbytes] uint8 on the CPU, starting on an IO_ALIGN boundary; pages are touched only when written."""
    raw = torch.empty(nbytes + IO_ALIGN, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % IO_ALIGN
    return raw[skip: skip + nbytes]


class HostBuffer:
    """An aligned host buffer; with pin, page-locked for as long as this object lives."""

    def __init__(self, nbytes: int, pin: bool) -> None:
        self.tensor = aligned_empty(nbytes)  # [nbytes] uint8
        self.pinned = False
        if pin:
            _check(torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, 0), nbytes)
            self.pinned = True

    def __del__(self) -> None:
        # Runs before self.tensor is released: the pages are unlocked while they are still ours.
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())


def _check(status: object, nbytes: int) -> None:
    if int(status) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed with CUDA error {int(status)}: "
                           "not enough page-lockable host memory (see `ulimit -l`)")
