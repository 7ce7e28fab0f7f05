"""What the host and NVMe stores share: the layouts, this process's share of each layer, and loading.

A store keeps every decoder layer's bytes, or with a shard (several GPUs streaming together) this
process's share of each. A checkpoint loads into whole-layer buffers (`layer_buffer`): the store's own
memory when it keeps whole layers, else temporary host buffers. The loader calls complete_layer as soon as a
layer has all its tensors, which keeps the share and frees the buffer, so a sharded process holds only the
layers still loading (one at a time for a checkpoint in layer order), never the whole model; finish_loading
keeps whatever is left.
"""

from __future__ import annotations

import torch

from scaleinfer.offload.buffers import aligned_empty
from scaleinfer.offload.layout import LayerLayout
from scaleinfer.offload.shard import Shard


class LayerStore:
    direct_io = False

    def __init__(self, layouts: list[LayerLayout], shard: Shard | None) -> None:
        self.layouts, self.shard = layouts, shard
        self._whole: dict[int, torch.Tensor] = {}  # sharded: whole layers while a checkpoint loads
        self._kept_early: set[int] = set()  # sharded: layers whose share complete_layer has kept
        self.max_live_buffers = 0  # sharded: the most whole-layer buffers alive at once while loading

    @property
    def nbytes(self) -> int:
        """Bytes of every layer together (all shares)."""
        return sum(layout.nbytes for layout in self.layouts)

    def share(self, index: int) -> tuple[int, int]:
        """(offset, size) of the part of layer `index` this process keeps."""
        nbytes = self.layouts[index].nbytes
        return self.shard.range_of(nbytes) if self.shard else (0, nbytes)

    def layer_buffer(self, index: int) -> torch.Tensor:
        """[nbytes] uint8 where layer `index` is written while loading (valid until complete_layer or
        finish_loading). Asked again after complete_layer, it holds the kept share again, so a late tensor
        (a checkpoint in an odd order) adds to the layer rather than wiping it."""
        if self.shard is None:
            return self._kept(index)
        if index not in self._whole:
            self._whole[index] = self._new_whole(index)
            self.max_live_buffers = max(self.max_live_buffers, len(self._whole))
        return self._whole[index]

    def complete_layer(self, index: int) -> None:
        """Layer `index` has all its tensors: keep this process's share now and free its whole-layer buffer."""
        whole = self._whole.pop(index, None)
        if whole is not None:
            self.write_layer(index, whole)
            self._kept_early.add(index)

    def write_layer(self, index: int, src: torch.Tensor) -> None:
        """Store layer `index` from src ([>= nbytes] uint8, on any device): this process's share of it."""
        offset, size = self.share(index)
        self._kept(index).copy_(src[offset : offset + size])

    def finish_loading(self) -> None:
        for index in list(self._whole):
            self.complete_layer(index)
        self._kept_early.clear()

    def read_into(self, index: int, dst: torch.Tensor) -> None:
        """Put this process's share of layer `index` at its offset in dst ([>= nbytes] uint8, aligned host
        memory); blocks until done."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the stored bytes (and any files)."""
        raise NotImplementedError

    def _new_whole(self, index: int) -> torch.Tensor:
        # Only this process's share of the buffer is ever kept, so restoring it restores all that matters.
        whole = aligned_empty(self.layouts[index].nbytes)
        if index in self._kept_early:
            offset, size = self.share(index)
            whole[offset : offset + size].copy_(self._kept(index))
        return whole

    def _kept(self, index: int) -> torch.Tensor:
        """[share size] uint8: the store's own bytes of layer `index`, writable while loading."""
        raise NotImplementedError
