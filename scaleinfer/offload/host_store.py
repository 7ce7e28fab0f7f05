"""offload="cpu": every layer's bytes in host memory, page-locked when they are streamed to a GPU."""

from __future__ import annotations

import torch

from scaleinfer.offload.buffers import HostBuffer
from scaleinfer.offload.layout import LayerLayout


class HostStore:
    def __init__(self, layouts: list[LayerLayout], pin: bool) -> None:
        self.layouts = layouts
        self.buffers = [HostBuffer(layout.nbytes, pin) for layout in layouts]
        self.pinned = pin
        self.direct_io = False

    @property
    def nbytes(self) -> int:
        return sum(layout.nbytes for layout in self.layouts)

    def layer_buffer(self, index: int) -> torch.Tensor:
        """[nbytes] uint8: where layer `index` is written while loading, and read from while streaming."""
        return self.buffers[index].tensor

    def finish_loading(self) -> None:
        """Nothing to flush: the bytes are already where they are read from."""

    def read_into(self, index: int, dst: torch.Tensor) -> None:
        """Copy layer `index` into dst ([>= nbytes] uint8, host memory); blocks until done."""
        src = self.buffers[index].tensor
        dst[: src.numel()].copy_(src)

    def close(self) -> None:
        self.buffers = []
