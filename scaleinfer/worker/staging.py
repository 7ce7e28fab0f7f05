"""A step's integers to the device in one copy, through persistent pinned host buffers.

Two pinned host buffers take turns: a call packs its values into one and copies them (non_blocking) into
a single device buffer, then records an event. A host buffer is rewritten only once the copy that last
read it has finished, so the host never races an in-flight copy; the device buffer is rewritten by the
next call's copy, which the stream orders after every kernel of the step that read it.
"""

from __future__ import annotations

import array
import ctypes

import torch

INITIAL_CAPACITY = 1 << 16  # int64 values: 512 KiB per buffer; grows when a step needs more


class StagingBuffer:
    def __init__(self, device: torch.device, capacity: int = INITIAL_CAPACITY) -> None:
        if capacity <= 0:
            raise ValueError(f"staging capacity must be positive, got {capacity}")
        self.device = device
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        pin = self.device.type == "cuda"
        self.capacity = capacity
        self.host = [torch.empty(capacity, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self.device_buffer = torch.empty(capacity, dtype=torch.int64, device=self.device)
        # Marks the end of the copy that last read each host buffer (CPU copies are synchronous: none needed).
        # Dropping an old pinned buffer mid-copy is safe: torch's host allocator keeps it until its copies finish.
        self.events = [torch.cuda.Event() for _ in range(2)] if pin else None
        self.turn = 0

    def upload(self, values: list[int]) -> torch.Tensor:
        """values as a device int64 tensor [len(values)]: a view valid until the next call."""
        n = len(values)
        if n > self.capacity:
            self._allocate(max(n, 2 * self.capacity))
        turn, self.turn = self.turn, self.turn ^ 1
        if self.events is not None:
            # In steady state long done: the step that issued it synchronized on its sampled tokens.
            self.events[turn].synchronize()  # returns at once for an event never recorded
        host = self.host[turn][:n]
        # One C-level conversion and a memmove into the pinned buffer: a third of torch.tensor(values) + copy_.
        packed = array.array("q", values)
        ctypes.memmove(host.data_ptr(), packed.buffer_info()[0], n * packed.itemsize)
        out = self.device_buffer[:n]
        out.copy_(host, non_blocking=True)
        if self.events is not None:
            self.events[turn].record()
        return out
