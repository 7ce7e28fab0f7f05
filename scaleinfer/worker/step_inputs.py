"""SchedulerOutput -> the tensors of one forward step.

Token order: decodes (one token each) first, then each multi-token chunk contiguously, so the decode
rows of q are one slice and each prefill chunk another. Every integer of the step is packed into one flat
list, each part padded to 16 bytes, and reaches the device in one copy (through a StagingBuffer's pinned
memory when one is given); the tensors are views into it, in this order: input_ids, positions,
slot_mapping, decode context_lens, sample_rows, query_start_loc, prefill start_pos, decode block tables,
prefill block tables.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from scaleinfer.layers.attention import AttentionMetadata, PrefillMetadata
from scaleinfer.outputs import ScheduledSequence, SchedulerOutput
from scaleinfer.worker.staging import StagingBuffer


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    attn: AttentionMetadata
    sample_rows: torch.Tensor  # [num_sampled] int64: index of each sampled sequence's last token
    sampled: list[ScheduledSequence]  # in the order of sample_rows
    max_decode_context_len: int  # host int: the longest decode context (0 without decodes)
    # [4, num_decodes] int64, rows input_ids, positions, slot_mapping, context_lens, of a pure-decode step
    # (None otherwise): one view over the packed values, so a CUDA graph takes them in one copy.
    decode_rows: torch.Tensor | None

    def sampled_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [num_tokens, hidden] -> the sampled rows [num_sampled, hidden]. When every token is
        sampled (a pure-decode step) sample_rows is 0..n-1: no gather (a kernel and its launch saved)."""
        return hidden if len(self.sampled) == hidden.shape[0] else hidden[self.sample_rows]


@dataclass(slots=True)
class _PackedViews:
    """The step's tensors as views of the one packed device tensor, in packing order."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    decode_context_lens: torch.Tensor
    sample_rows: torch.Tensor
    query_start_loc: torch.Tensor
    start_pos: torch.Tensor
    seq_lens: torch.Tensor
    decode_block_tables: torch.Tensor  # flat
    prefill_block_tables: torch.Tensor  # flat


def order_for_step(output: SchedulerOutput) -> list[ScheduledSequence]:
    decodes, chunks = _decodes_and_chunks(output.scheduled)
    return decodes + chunks


def build_step_inputs(output: SchedulerOutput, block_size: int, device: torch.device,
                      staging: StagingBuffer | None = None) -> StepInputs:
    """With staging, the tensors are views into its device buffer, valid until its next upload; without,
    fresh tensors."""
    decodes, chunks = _decodes_and_chunks(output.scheduled)
    num_decodes = len(decodes)
    parts = _packed_parts(decodes, chunks, block_size)
    sizes = [len(p) for p in parts]
    padded = [_aligned(n) for n in sizes]
    flat = list(itertools.chain.from_iterable(p + [0] * (m - n) for p, n, m in zip(parts, sizes, padded)))
    values = staging.upload(flat) if staging is not None else torch.tensor(flat, dtype=torch.int64, device=device)
    views = _PackedViews(*(v[:n] for v, n in zip(values.split_with_sizes(padded), sizes)))
    rows = padded[0]  # the first four parts are num_decodes long in a pure-decode step, each padded alike
    return StepInputs(
        input_ids=views.input_ids,
        positions=views.positions,
        attn=_attention_metadata(views, decodes, chunks),
        sample_rows=views.sample_rows,
        sampled=[s for s in decodes if s.sample] + [s for s in chunks if s.sample],
        max_decode_context_len=max(parts[_CONTEXT_LENS], default=0),
        decode_rows=values[: 4 * rows].view(4, rows)[:, :num_decodes] if decodes and not chunks else None,
    )


def _decodes_and_chunks(scheduled: list[ScheduledSequence]) -> tuple[list[ScheduledSequence],
                                                                      list[ScheduledSequence]]:
    """The one-token sequences and the multi-token chunks, each in scheduling order."""
    decodes = [s for s in scheduled if len(s.token_ids) == 1]
    if len(decodes) == len(scheduled):
        return decodes, []
    return decodes, [s for s in scheduled if len(s.token_ids) > 1]


_CONTEXT_LENS = 3  # index of the decode context_lens among _packed_parts' lists
# Each list starts at a multiple of 16 bytes (two int64s) in the packed tensor: a Triton kernel compiles one variant per
# alignment class of each pointer it takes, and views at offsets that follow the step's token and sequence
# counts made the prefill kernel compile a new variant mid-run, a second or more each on a cold cache.
_ALIGN_INTS = 2


def _aligned(n: int) -> int:
    return -(-n // _ALIGN_INTS) * _ALIGN_INTS


def _packed_parts(decodes: list[ScheduledSequence], chunks: list[ScheduledSequence],
                  block_size: int) -> list[list[int]]:
    """The step's integer lists in _PackedViews' order."""
    # A decode computes the one token at start_pos; its context is start_pos + 1 tokens.
    input_ids = [s.token_ids[0] for s in decodes]
    positions = [s.start_pos for s in decodes]
    slots = [s.block_table[p // block_size] * block_size + p % block_size for s, p in zip(decodes, positions)]
    sample_rows = [row for row, s in enumerate(decodes) if s.sample]
    for seq in chunks:
        pos = range(seq.start_pos, seq.context_len)
        input_ids.extend(seq.token_ids)
        positions.extend(pos)
        slots.extend(seq.block_table[p // block_size] * block_size + p % block_size for p in pos)
        if seq.sample:
            sample_rows.append(len(input_ids) - 1)
    return [input_ids, positions, slots, [p + 1 for p in positions[:len(decodes)]], sample_rows,
            _query_start_loc(chunks), [s.start_pos for s in chunks],
            [len(s.prompt_token_ids) + s.num_output_tokens for s in chunks], _flat_padded_tables(decodes),
            _flat_padded_tables(chunks)]


def _attention_metadata(views: _PackedViews, decodes: list[ScheduledSequence],
                        chunks: list[ScheduledSequence]) -> AttentionMetadata:
    prefill = None
    if chunks:
        prefill = PrefillMetadata(
            block_tables=views.prefill_block_tables.view(len(chunks), -1),
            query_start_loc=views.query_start_loc,
            start_pos=views.start_pos,
            max_query_len=max(s.num_tokens for s in chunks),
            seq_lens=views.seq_lens,
        )
    return AttentionMetadata(
        slot_mapping=views.slot_mapping,
        num_decodes=len(decodes),
        decode_block_tables=views.decode_block_tables.view(len(decodes), -1) if decodes else None,
        decode_context_lens=views.decode_context_lens if decodes else None,
        prefill=prefill,
    )


def _query_start_loc(chunks: list[ScheduledSequence]) -> list[int]:
    if not chunks:
        return []
    return list(itertools.accumulate((s.num_tokens for s in chunks), initial=0))


def _flat_padded_tables(seqs: list[ScheduledSequence]) -> list[int]:
    """The block tables, each padded with block 0 to the longest, row after row."""
    if not seqs:
        return []
    tables = [s.block_table for s in seqs]
    width = max(map(len, tables))
    flat: list[int] = []
    for table in tables:
        flat += table
        if len(table) < width:
            flat += [0] * (width - len(table))
    return flat
