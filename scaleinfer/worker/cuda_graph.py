"""Decode steps captured in CUDA graphs, one per padded batch size, replayed with inputs copied in.

A pure-decode step of n sequences runs the graph of the smallest captured size >= n. Padded rows write
their K/V to a scratch block that no sequence owns, attend over one token of it, and are dropped.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from scaleinfer.layers.attention import AttentionMetadata
from scaleinfer.worker.step_inputs import StepInputs


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_num_seqs (at most 256)."""
    top = min(max_num_seqs, 256)
    sizes = [s for s in (1, 2, 4, 8) if s <= top] + list(range(16, top + 1, 8))
    return sizes if sizes[-1] == top else sizes + [top]


class DecodeGraphs:
    def __init__(self, model: nn.Module, sizes: list[int], max_blocks_per_seq: int, scratch_block: int,
                 block_size: int, device: torch.device) -> None:
        self.model, self.sizes = model, sizes
        self.scratch_block, self.scratch_slot = scratch_block, scratch_block * block_size
        max_bs = sizes[-1]
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_bs,), self.scratch_slot, dtype=torch.int64, device=device)
        self.block_tables = torch.full((max_bs, max_blocks_per_seq), scratch_block, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(max_bs, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first: smaller graphs reuse its memory pool
            self._forward(size)  # warm-up outside the graph (lazy init, autotuning)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start

    def _forward(self, size: int) -> torch.Tensor:
        meta = AttentionMetadata(slot_mapping=self.slot_mapping[:size], num_decodes=size,
                                 decode_block_tables=self.block_tables[:size],
                                 decode_context_lens=self.context_lens[:size])
        return self.model(self.input_ids[:size], self.positions[:size], meta)

    def can_run(self, inputs: StepInputs) -> bool:
        attn = inputs.attn
        return attn.prefill is None and 0 < attn.num_decodes <= self.sizes[-1]

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Hidden states [num_decodes, hidden] of a pure-decode step."""
        n = inputs.attn.num_decodes
        size = next(s for s in self.sizes if s >= n)
        self._fill(n, size, inputs)
        self.graphs[size].replay()
        return self.outputs[size][:n]

    def _fill(self, n: int, size: int, inputs: StepInputs) -> None:
        attn = inputs.attn
        self.input_ids[:n].copy_(inputs.input_ids, non_blocking=True)
        self.positions[:n].copy_(inputs.positions, non_blocking=True)
        self.slot_mapping[:n].copy_(attn.slot_mapping, non_blocking=True)
        self.context_lens[:n].copy_(attn.decode_context_lens, non_blocking=True)
        width = attn.decode_block_tables.shape[1]
        self.block_tables[:n, :width].copy_(attn.decode_block_tables, non_blocking=True)
        self._reset_padding(n, size)

    def _reset_padding(self, n: int, size: int) -> None:
        # Rows n..size belong to no sequence: one token of the scratch block, written and read.
        self.slot_mapping[n:size].fill_(self.scratch_slot)
        self.context_lens[n:size].fill_(1)
        self.block_tables[n:size, 0].fill_(self.scratch_block)
