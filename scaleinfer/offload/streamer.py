"""The layer ring: while layer i computes, the next layers are copied into the other slots.

The layers form an endless stream 0..L-1, 0..L-1, ...: position g of the stream (layer g % L) uses slot
g % K. When layer i finishes, its slot is released and receives the layer K positions ahead, so the first
layers of the next step arrive during the last layers of this one. With K >= L every layer keeps a slot
of its own and is copied once. Forward hooks on the layers drive it: the model file knows nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from scaleinfer.offload.fetcher import LayerFetcher, Slot, Store
from scaleinfer.offload.layout import LayerLayout, layer_params


class LayerStreamer:
    def __init__(self, layers: nn.ModuleList, layouts: list[LayerLayout], store: Store, device: torch.device,
                 num_slots: int) -> None:
        self.layouts, self.store = layouts, store
        self.num_layers = len(layers)
        self.num_slots = min(num_slots, self.num_layers)
        self.slot_bytes = max(layout.nbytes for layout in layouts)
        self.fetcher = LayerFetcher(store, device, self.slot_bytes, self.num_slots)
        self.slots = [self.fetcher.new_slot(i, self.slot_bytes) for i in range(self.num_slots)]
        self.params = [layer_params(layer, layout) for layer, layout in zip(layers, layouts)]
        # Views made once, outside inference mode, so binding a layer is a pointer swap per parameter.
        self.views = {(s.index, lo): lo.views(s.buffer) for s in self.slots for lo in set(layouts)}
        self.position = 0  # next position of the stream to compute
        self.compute_events: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] | None = None  # tracing
        self._compute_start: torch.cuda.Event | None = None
        for index, layer in enumerate(layers):
            self._bind(index, self.slots[index % self.num_slots])  # drops references to the loading buffers
            layer.register_forward_pre_hook(self._hook_before(index))
            layer.register_forward_hook(self._hook_after(index))

    @property
    def shard(self):
        """The processes streaming together (None: this one alone)."""
        return self.fetcher.shard

    @property
    def streams(self) -> bool:
        """Whether layers move every step (False: the budget holds them all, each was copied once)."""
        return self.num_slots < self.num_layers

    def _hook_before(self, index: int):
        def before(module: nn.Module, args: object) -> None:
            slot = self._slot_for(index)
            self.fetcher.wait(slot)
            self._bind(index, slot)
            self._trace_compute_start()
        return before

    def _hook_after(self, index: int):
        def after(module: nn.Module, args: object, output: object) -> None:
            self._trace_compute_end(index)
            if not self.streams:
                return
            slot = self.slots[self.position % self.num_slots]
            self.fetcher.release(slot)
            self.fetcher.fetch((index + self.num_slots) % self.num_layers, slot)
            self.position += 1
        return after

    def _slot_for(self, index: int) -> Slot:
        if self._expected_slot(index).layer != index:  # first step, or the last failed midway: refill from here
            self._restart_at(index)
        return self._expected_slot(index)

    def _expected_slot(self, index: int) -> Slot:
        return self.slots[self.position % self.num_slots if self.streams else index]

    def _restart_at(self, index: int) -> None:
        self.fetcher.drain()
        if not self.streams:
            self.fetcher.fetch(index, self.slots[index])
            return
        self.position = index
        for ahead in range(self.num_slots):
            layer = (index + ahead) % self.num_layers
            self.fetcher.fetch(layer, self.slots[(self.position + ahead) % self.num_slots])

    def _bind(self, index: int, slot: Slot) -> None:
        for param, view in zip(self.params[index], self.views[(slot.index, self.layouts[index])]):
            param.data = view

    def trace(self) -> None:
        """Record CUDA timing events around every layer's compute and copy from now on (tests, profiling)."""
        self.compute_events, self.fetcher.copy_events, self.fetcher.gather_events = [], [], []

    def _trace_compute_start(self) -> None:
        if self.compute_events is not None:
            self._compute_start = torch.cuda.Event(enable_timing=True)
            self._compute_start.record()

    def _trace_compute_end(self, index: int) -> None:
        if self.compute_events is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.compute_events.append((index, self._compute_start, end))

    def close(self) -> None:
        self.fetcher.close()
        self.store.close()

    def describe(self) -> dict[str, object]:
        """Start-up facts for logs and benchmark records."""
        return {"store": type(self.store).__name__, "store_bytes": self.store.nbytes, "num_slots": self.num_slots,
                "slot_bytes": self.slot_bytes, "streams": self.streams, "direct_io": self.store.direct_io,
                "num_shards": self.shard.world_size if self.shard else 1}
