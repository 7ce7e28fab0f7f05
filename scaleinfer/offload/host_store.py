"""offload="cpu": every layer's bytes in host memory, page-locked when they are streamed to a GPU. With a
shard (several GPUs streaming together) each process keeps only its share of every layer."""

from __future__ import annotations

import torch

from scaleinfer.offload.buffers import HostBuffer, aligned_empty
from scaleinfer.offload.layout import LayerLayout
from scaleinfer.offload.shard import Shard


class HostStore:
    def __init__(self, layouts: list[LayerLayout], pin: bool, shard: Shard | None = None) -> None:
        self.layouts, self.shard = layouts, shard
        self.buffers = [HostBuffer(self.share(i)[1], pin) for i in range(len(layouts))]
        self.pinned = pin
        self.direct_io = False
        self._whole: dict[int, torch.Tensor] = {}  # sharded: whole layers while a checkpoint loads

    @property
    def nbytes(self) -> int:
        """Bytes of every layer together (all shares)."""
        return sum(layout.nbytes for layout in self.layouts)

    def share(self, index: int) -> tuple[int, int]:
        """(offset, size) of the part of layer `index` this process keeps."""
        nbytes = self.layouts[index].nbytes
        return self.shard.range_of(nbytes) if self.shard else (0, nbytes)

    def layer_buffer(self, index: int) -> torch.Tensor:
        """[nbytes] uint8 where layer `index` is written while loading (kept until finish_loading)."""
        if self.shard is None:
            return self.buffers[index].tensor
        if index not in self._whole:
            self._whole[index] = aligned_empty(self.layouts[index].nbytes)
        return self._whole[index]

    def write_layer(self, index: int, src: torch.Tensor) -> None:
        """Store layer `index` from src ([>= nbytes] uint8, on any device): this process's share of it."""
        offset, size = self.share(index)
        self.buffers[index].tensor.copy_(src[offset: offset + size])

    def finish_loading(self) -> None:
        for index, whole in self._whole.items():
            self.write_layer(index, whole)
        self._whole.clear()

    def source(self, index: int) -> torch.Tensor:
        """[size] uint8: this process's share of layer `index`, to copy to the device."""
        return self.buffers[index].tensor

    def read_into(self, index: int, dst: torch.Tensor) -> None:
        """Copy this process's share of layer `index` to its offset in dst (host memory); blocks until done."""
        offset, size = self.share(index)
        dst[offset: offset + size].copy_(self.buffers[index].tensor)

    def close(self) -> None:
        self.buffers = []
