"""The host tier of the KV cache (kv_offload="cpu"): this rank's share of every host block, and the step's swaps.

Host layout: [num_blocks, 2 x num_layers, layer_block_bytes] bytes, page-locked on a GPU: one block's K and V of
every layer of this rank (its KV heads, its stage's layers) side by side, so a block, or a run of consecutive
blocks, crosses PCIe in one copy. The device cache keeps its per-layer layout, [num_device_blocks, block_size,
kv_heads, head_dim] for K and for V; blocks are gathered from it into a staging tensor of the host layout and
scattered back into it by block id, one kernel per layer and K/V.

A step's copies (SchedulerOutput.swap_out, then swap_in) run on a side stream on a GPU, in this order: wait for
the compute stream (the previous forward wrote the blocks going out); gather the swap-outs; bring the swap-ins in
and scatter them; let the compute stream wait for that; then copy the gathered swap-outs to the host, overlapping
the step's forward. A swap-in whose host block a swap-out of the same step writes takes it from the gathered
rows, which the step's swap-ins may not yet find in host memory. The next step's copies follow on the same
stream, so they see every host write before. On a CPU the same copies run in order, synchronously.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from scaleinfer.offload.buffers import HostBuffer
from scaleinfer.worker.staging import StagingBuffer

MAX_STAGED_BLOCKS = 64  # swap-ins staged on the device at once (bounds its transient memory)


class HostKVCache:
    def __init__(self, caches: list[tuple[torch.Tensor, torch.Tensor]], num_blocks: int,
                 device: torch.device) -> None:
        """caches: the device tier, each layer's (K, V); num_blocks: host blocks (0: no host tier)."""
        self.num_blocks, self.device = num_blocks, device
        # every layer's K and V as bytes, [num_device_blocks, layer_block_bytes] each
        self.device_rows = [t.view(torch.uint8).view(t.shape[0], -1) for kv in caches for t in kv]
        self.row_shape = (len(self.device_rows), self.device_rows[0].shape[1])
        self.blocks = torch.empty((0, *self.row_shape), dtype=torch.uint8)
        self.stream = self.ready = None
        if num_blocks == 0:
            return
        on_gpu = device.type == "cuda"
        self._buffer = HostBuffer(num_blocks * self.row_shape[0] * self.row_shape[1], pin=on_gpu)
        self.blocks = self._buffer.tensor.view(num_blocks, *self.row_shape)  # [num_blocks, 2 * layers, bytes]
        self.staging = StagingBuffer(device)  # the step's block ids
        if on_gpu:
            self.stream, self.ready = torch.cuda.Stream(device), torch.cuda.Event()

    @property
    def pinned(self) -> bool:
        """The host blocks are page-locked (registered with cudaHostRegister, which torch's is_pinned does not
        report: it knows only its own allocator's pages)."""
        return self.num_blocks > 0 and self._buffer.pinned

    def swap(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Move the step's blocks, (device block id, host block index) pairs; the compute stream's next work (the
        step's forward) runs after every swap-in has landed and every swapped-out block has been read."""
        if not swap_out and not swap_in:
            return
        plan = SwapPlan.of(swap_out, swap_in)
        compute = torch.cuda.current_stream(self.device) if self.stream is not None else None
        if compute is not None:
            self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            index = iter(self.staging.upload(plan.index_values).split(plan.index_sizes))
            gathered = self._gather(next(index)) if plan.out_hosts else None  # [len(out_hosts), 2 * layers, bytes]
            for chunk, device_index in zip(plan.in_chunks(), index):
                self._scatter(device_index, self._from_host(chunk))
            if plan.pending_rows:
                rows_index, device_index = next(index), next(index)
                self._scatter(device_index, gathered.index_select(0, rows_index))
            if compute is not None:
                self.ready.record(self.stream)
                compute.wait_event(self.ready)
            for first, host, num in _runs(plan.out_hosts):
                self.blocks[host:host + num].copy_(gathered[first:first + num], non_blocking=True)

    def _gather(self, device_index: torch.Tensor) -> torch.Tensor:
        """Those device blocks as rows [len(device_index), 2 * layers, bytes], one layer's K or V at a time (transient
        memory: the rows and one layer's share)."""
        rows = torch.empty((len(device_index), *self.row_shape), dtype=torch.uint8, device=self.device)
        layer_rows = torch.empty((len(device_index), self.row_shape[1]), dtype=torch.uint8, device=self.device)
        for layer, cache_rows in enumerate(self.device_rows):
            rows[:, layer] = torch.index_select(cache_rows, 0, device_index, out=layer_rows)
        return rows

    def _from_host(self, host_ids: list[int]) -> torch.Tensor:
        """Host blocks (ascending indices) as rows [len(host_ids), 2 * layers, bytes] on the device."""
        rows = torch.empty((len(host_ids), *self.row_shape), dtype=torch.uint8, device=self.device)
        for first, host, num in _runs(host_ids):
            rows[first:first + num].copy_(self.blocks[host:host + num], non_blocking=True)
        return rows

    def _scatter(self, device_index: torch.Tensor, rows: torch.Tensor) -> None:
        """rows [len(device_index), 2 * layers, bytes] into those device blocks."""
        for layer, cache_rows in enumerate(self.device_rows):
            cache_rows.index_copy_(0, device_index, rows[:, layer])


@dataclass(slots=True)
class SwapPlan:
    """A step's pairs as the copies take them: the host blocks written (ascending, each once: the last pair naming
    one wins) and their device sources; the swap-ins from host memory, by ascending host block; and those whose
    host block this step writes (taken from the gathered rows instead)."""

    out_hosts: list[int]
    out_devices: list[int]
    in_hosts: list[int]
    in_devices: list[int]
    pending_rows: list[int]  # rows of the gathered swap-outs
    pending_devices: list[int]

    @classmethod
    def of(cls, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> SwapPlan:
        last_write = {host: device for device, host in swap_out}
        out_hosts = sorted(last_write)
        row_of = {host: row for row, host in enumerate(out_hosts)}
        from_host = sorted((host, device) for device, host in swap_in if host not in row_of)
        pending = [(row_of[host], device) for device, host in swap_in if host in row_of]
        return cls(out_hosts, [last_write[host] for host in out_hosts], [host for host, _ in from_host],
                   [device for _, device in from_host], [row for row, _ in pending], [device for _, device in pending])

    def in_chunks(self) -> list[list[int]]:
        hosts = self.in_hosts
        return [hosts[start:start + MAX_STAGED_BLOCKS] for start in range(0, len(hosts), MAX_STAGED_BLOCKS)]

    @property
    def index_values(self) -> list[int]:
        """Every device-side index of the step, in one upload: gather sources, swap-in destinations, pending."""
        return self.out_devices + self.in_devices + self.pending_rows + self.pending_devices

    @property
    def index_sizes(self) -> list[int]:
        chunks = [len(chunk) for chunk in self.in_chunks()]
        pending = [len(self.pending_rows)] * 2 if self.pending_rows else []
        return ([len(self.out_hosts)] if self.out_hosts else []) + chunks + pending


def _runs(host_ids: list[int]) -> list[tuple[int, int, int]]:
    """(position in host_ids, first host index, length) of each run of consecutive indices in ascending host_ids."""
    runs: list[tuple[int, int, int]] = []
    for position, host in enumerate(host_ids):
        if runs and runs[-1][1] + runs[-1][2] == host:
            first, start, num = runs[-1]
            runs[-1] = (first, start, num + 1)
        else:
            runs.append((position, host, 1))
    return runs
