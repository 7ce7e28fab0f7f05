"""Decode steps captured in CUDA graphs, one per (padded batch size, context bucket), replayed with inputs
copied in.

A pure-decode step of n sequences whose longest context is L runs the graph of the smallest captured size
>= n and, of that size's buckets, the narrowest block table that holds L tokens. The decode attention
kernel sizes its grid (and whether it needs a reduce) from the block table's width, fixed at capture, so
a short context replays a graph with few, short partitions instead of one sized for max_model_len.
Padded rows write their K/V to a scratch block that no sequence owns, attend over one token of it, and
are dropped.

One runner for one process and for pipeline stages, told what a step takes and gives: a graph reads the token
rows and, on a stage past the first, the previous stage's hidden states from a static buffer
([stage_tensors, max batch, hidden_size]) that the caller fills before each replay; it gives the hidden states
[batch, hidden_size] (one process, the last stage) or [stage_tensors, batch, hidden_size] for the next stage,
rows along dim -2 either way. The point-to-point receive and send stay outside the graph (worker/stage_io.py).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from scaleinfer.layers.attention import AttentionMetadata
from scaleinfer.worker.step_inputs import StepInputs

FIRST_BUCKET = 256  # context tokens of the shortest bucket; each next one is BUCKET_GROWTH times longer
BUCKET_GROWTH = 8
# Larger batches get only the full-width bucket: with 8 KV heads, 33+ sequences already give the decode
# kernel two programs per multiprocessor of an H100 with one partition each, whatever the width.
MAX_BUCKETED_BATCH = 32


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_num_seqs (at most 256)."""
    top = min(max_num_seqs, 256)
    sizes = [s for s in (1, 2, 4, 8) if s <= top] + list(range(16, top + 1, 8))
    return sizes if sizes[-1] == top else sizes + [top]


def bucket_widths(max_blocks_per_seq: int, block_size: int) -> list[int]:
    """Block-table widths of the context buckets (256, 2048, 16384, ... tokens), ending at max_blocks_per_seq."""
    widths, tokens = [], FIRST_BUCKET
    while (width := -(-tokens // block_size)) < max_blocks_per_seq:
        widths.append(width)
        tokens *= BUCKET_GROWTH
    return widths + [max_blocks_per_seq]


def capture_plan(sizes: list[int], max_blocks_per_seq: int, block_size: int) -> dict[int, list[int]]:
    """Batch size -> the block-table widths captured for it, ascending."""
    widths = bucket_widths(max_blocks_per_seq, block_size)
    return {size: widths if size <= MAX_BUCKETED_BATCH else widths[-1:] for size in sizes}


def graph_key(plan: dict[int, list[int]], num_decodes: int, max_context_len: int,
              block_size: int) -> tuple[int, int] | None:
    """(size, width) of the graph for a step, or None when no captured graph holds it."""
    size = next((s for s in plan if s >= num_decodes), None)
    if size is None:
        return None
    needed = -(-max_context_len // block_size)
    width = next((w for w in plan[size] if w >= needed), None)
    return None if width is None else (size, width)


class DecodeGraphs:
    def __init__(self, model: nn.Module, sizes: list[int], max_blocks_per_seq: int, scratch_block: int,
                 block_size: int, device: torch.device, hidden_in: torch.Tensor | None = None) -> None:
        """hidden_in: the static buffer of the previous stage's hidden states, [stage_tensors, >= sizes[-1],
        hidden_size]; None where a step starts from its token ids."""
        self.model, self.sizes, self.block_size = model, sizes, block_size
        if hidden_in is not None and hidden_in.shape[1] < sizes[-1]:
            raise ValueError(f"hidden_in holds {hidden_in.shape[1]} rows, fewer than the largest graph's {sizes[-1]}")
        self.hidden_in = hidden_in
        self.plan = capture_plan(sizes, max_blocks_per_seq, block_size)
        self.scratch_block, self.scratch_slot = scratch_block, scratch_block * block_size
        max_bs = sizes[-1]
        # Rows: input_ids, positions, slot_mapping, context_lens. Padding rows hold (0, 0, scratch slot, 1).
        self.padding = torch.tensor([[0], [0], [self.scratch_slot], [1]], device=device).expand(4, max_bs)
        self.rows = self.padding.clone(memory_format=torch.contiguous_format)  # [4, max_bs] int64
        self.block_tables = torch.full((max_bs, max_blocks_per_seq), scratch_block, dtype=torch.int64, device=device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.capture_seconds = 0.0
        self.num_replays = 0  # steps replayed from a graph (describe() reports it)
        self.capture_log: list[tuple[int, int, float, float]] = []  # (size, width, warm-up s, capture s)

    @property
    def bucket_tokens(self) -> list[int]:
        """The context buckets of the smallest batch size, in tokens (the last is the full width)."""
        return [width * self.block_size for width in self.plan[self.sizes[0]]]

    @property
    def keys(self) -> list[tuple[int, int]]:
        return [(size, width) for size, widths in self.plan.items() for width in widths]

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for key in sorted(self.keys, reverse=True):  # largest first: smaller graphs reuse its memory pool
            begin = time.perf_counter()
            self._forward(*key)  # warm-up outside the graph (lazy init, autotuning)
            torch.cuda.synchronize()
            warmed = time.perf_counter()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[key] = self._forward(*key)
            self.graphs[key] = graph
            torch.cuda.synchronize()
            self.capture_log.append((*key, warmed - begin, time.perf_counter() - warmed))
        self.capture_seconds = time.perf_counter() - start

    def _forward(self, size: int, width: int) -> torch.Tensor:
        input_ids, positions, slot_mapping, context_lens = self.rows[:, :size]
        # The block table's width fixes the decode kernel's max_context_len for this graph.
        meta = AttentionMetadata(slot_mapping=slot_mapping, num_decodes=size,
                                 decode_block_tables=self.block_tables[:size, :width], decode_context_lens=context_lens)
        hidden = None if self.hidden_in is None else self.hidden_in[:, :size]  # [stage_tensors, size, hidden]
        return self.model(input_ids, positions, meta, hidden)

    def can_run(self, inputs: StepInputs) -> bool:
        return inputs.decode_rows is not None and self._key(inputs) is not None

    def run(self, inputs: StepInputs, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The output rows (dim -2) of a pure-decode step's num_decodes sequences; hidden: the previous stage's
        [stage_tensors, num_decodes, hidden_size] (None on the first stage)."""
        key = self._key(inputs)
        self._fill(inputs.attn.num_decodes, key[0], inputs)
        return self.replay(key, inputs.attn.num_decodes, hidden)

    def key(self, n: int, max_context_len: int) -> tuple[int, int] | None:
        """The graph of a decode step of n sequences whose longest context is max_context_len; None: none holds it."""
        return graph_key(self.plan, n, max_context_len, self.block_size)

    def replay(self, key: tuple[int, int], n: int, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The output rows of the step the token rows hold (filled, or prepared by `advance`): a view of the
        graph's static output, valid until its next replay."""
        if (hidden is None) != (self.hidden_in is None):
            raise ValueError("a stage's graphs take the previous stage's hidden states, and only those: got "
                             f"{'none' if hidden is None else tuple(hidden.shape)}")
        if hidden is not None:
            self.hidden_in[:, :n].copy_(hidden)  # rows n..size keep earlier values: padding, dropped
        self.graphs[key].replay()
        self.num_replays += 1
        return self.outputs[key].narrow(-2, 0, n)

    def advance(self, n: int, token_ids: torch.Tensor) -> None:
        """Rows 0..n for the same sequences' next token, on the device: input ids from token_ids ([n] int64),
        positions, slots and context lengths one further (the caller checked that each next slot is in a block
        the table already holds). Padding rows and block tables stay as the last fill left them."""
        self.rows[0, :n].copy_(token_ids)
        self.rows[1:, :n] += 1

    def _key(self, inputs: StepInputs) -> tuple[int, int] | None:
        return self.key(inputs.attn.num_decodes, inputs.max_decode_context_len)

    def _fill(self, n: int, size: int, inputs: StepInputs) -> None:
        self.rows[:, :n].copy_(inputs.decode_rows, non_blocking=True)
        tables = inputs.attn.decode_block_tables
        self.block_tables[:n, : tables.shape[1]].copy_(tables, non_blocking=True)
        if n < size:
            # Rows n..size belong to no sequence: one token of the scratch block, written and read.
            self.rows[:, n:size].copy_(self.padding[:, n:size])
            self.block_tables[n:size, 0].fill_(self.scratch_block)
