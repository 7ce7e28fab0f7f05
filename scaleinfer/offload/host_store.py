"""offload="cpu": every layer's bytes (or this process's share) in host memory, page-locked when they are
streamed to a GPU."""

from __future__ import annotations

import torch

from scaleinfer.offload.buffers import HostBuffer
from scaleinfer.offload.layout import LayerLayout
from scaleinfer.offload.shard import Shard
from scaleinfer.offload.store import LayerStore


class HostStore(LayerStore):
    def __init__(self, layouts: list[LayerLayout], pin: bool, shard: Shard | None = None) -> None:
        super().__init__(layouts, shard)
        self.buffers = [HostBuffer(self.share(i)[1], pin) for i in range(len(layouts))]
        self.pinned = pin

    def source(self, index: int) -> torch.Tensor:
        """[size] uint8: this process's share of layer `index`, to copy to the device."""
        return self.buffers[index].tensor

    def read_into(self, index: int, dst: torch.Tensor) -> None:
        """Copy this process's share of layer `index` to its offset in dst (host memory); blocks until done."""
        offset, size = self.share(index)
        dst[offset: offset + size].copy_(self.buffers[index].tensor)

    def close(self) -> None:
        self.buffers = []

    def _kept(self, index: int) -> torch.Tensor:
        return self.buffers[index].tensor
