"""Moving one layer from its store into a device slot.

On a GPU the copy runs on a side stream; the compute stream waits on the slot's `ready` event, never on
the whole transfer, and the copy into a slot waits on its `free` event (the last compute that read it).
Disk reads (and every copy on a machine without a GPU) run in a background thread, so the compute thread
only blocks when the layer it needs next has not arrived. With a shard, each process copies its share and the
shares are all-gathered on a second side stream, so the next layer's copy overlaps this layer's gather.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from scaleinfer.offload.buffers import HostBuffer, aligned_empty
from scaleinfer.offload.host_store import HostStore
from scaleinfer.offload.store import LayerStore as Store


@dataclass(slots=True, eq=False)
class Slot:
    index: int
    buffer: torch.Tensor  # [slot_bytes] uint8 on the compute device
    layer: int = -1  # the layer it holds or is receiving; -1: none
    pending: Future | None = None  # the background part of a fetch still running
    ready: torch.cuda.Event | None = None  # GPU: recorded when the copy into buffer is done
    free: torch.cuda.Event | None = None  # GPU: recorded when the compute reading buffer is done


class LayerFetcher:
    def __init__(self, store: Store, device: torch.device, slot_bytes: int, num_slots: int) -> None:
        self.store, self.device = store, device
        self.shard = store.shard
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.gather_stream = torch.cuda.Stream(device) if self.cuda and self.shard else None
        inline = self.cuda and isinstance(store, HostStore)  # an async copy from pinned memory needs no thread
        self.thread = None if inline else ThreadPoolExecutor(1, thread_name_prefix="scaleinfer-fetch")
        needs_staging = self.cuda and not inline
        self.staging = [HostBuffer(slot_bytes, pin=True) for _ in range(num_slots)] if needs_staging else []
        self.copy_events: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] | None = None  # tracing
        self.gather_events: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] | None = None  # (H2D end, gather end)

    def new_slot(self, index: int, slot_bytes: int) -> Slot:
        if not self.cuda:
            return Slot(index, aligned_empty(slot_bytes))  # aligned: O_DIRECT reads land in it directly
        buffer = torch.empty(slot_bytes, dtype=torch.uint8, device=self.device)
        return Slot(index, buffer, ready=torch.cuda.Event(), free=torch.cuda.Event())

    def fetch(self, layer: int, slot: Slot) -> None:
        """Start moving `layer` into `slot`; wait() finishes it."""
        slot.layer = layer
        if self.thread is None:
            self._copy_to_device(layer, self.store.source(layer), slot)
        else:
            slot.pending = self.thread.submit(self._fetch_in_background, layer, slot)

    def release(self, slot: Slot) -> None:
        """The compute queued so far is the last to read slot: a fetch into it may follow."""
        if self.cuda:
            slot.free.record(torch.cuda.current_stream(self.device))

    def wait(self, slot: Slot) -> None:
        """Make the current stream (GPU) or thread (CPU) wait until slot holds its layer."""
        pending, slot.pending = slot.pending, None
        if pending is not None:
            try:
                pending.result()
            except BaseException:
                slot.layer = -1  # the slot's content is unknown: fetch again next time
                raise
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)

    def drain(self) -> None:
        """Wait for every background fetch, ignoring their errors (after a failed step)."""
        if self.thread is not None:
            self.thread.submit(lambda: None).result()

    def _fetch_in_background(self, layer: int, slot: Slot) -> None:
        if not self.cuda:
            self.store.read_into(layer, slot.buffer)
            if self.shard is not None:
                self.shard.all_gather(slot.buffer[: self.store.layouts[layer].nbytes])
            return
        staging = self.staging[slot.index].tensor
        slot.ready.synchronize()  # the previous copy out of this staging buffer has finished
        self.store.read_into(layer, staging)  # this process's share, at its offset
        with torch.cuda.device(self.device):
            self._copy_to_device(layer, staging[self.store.share(layer)[0]:], slot)

    def _copy_to_device(self, layer: int, src: torch.Tensor, slot: Slot) -> None:
        """src: [>= size] uint8 host memory, this process's share of the layer."""
        offset, size = self.store.share(layer)
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(slot.free)
            start = self._trace_start()
            slot.buffer[offset: offset + size].copy_(src[:size], non_blocking=True)
            slot.ready.record(self.copy_stream)
        if self.shard is not None:
            copied = self._trace_start()
            with torch.cuda.stream(self.gather_stream):
                self.gather_stream.wait_event(slot.ready)
                self.shard.all_gather(slot.buffer[: self.store.layouts[layer].nbytes])
                slot.ready.record(self.gather_stream)
            self._trace_gather(layer, copied)
        self._trace_end(layer, start)

    def _trace_start(self) -> torch.cuda.Event | None:
        if self.copy_events is None:
            return None
        start = torch.cuda.Event(enable_timing=True)
        start.record(self.copy_stream)
        return start

    def _trace_gather(self, layer: int, copied: torch.cuda.Event | None) -> None:
        if copied is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record(self.gather_stream)
            self.gather_events.append((layer, copied, end))

    def _trace_end(self, layer: int, start: torch.cuda.Event | None) -> None:
        if start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record(self.gather_stream or self.copy_stream)
            self.copy_events.append((layer, start, end))

    def close(self) -> None:
        if self.thread is not None:
            self.thread.shutdown(wait=True)
