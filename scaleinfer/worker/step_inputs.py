"""SchedulerOutput -> the tensors of one forward step.

Token order: decodes (one token each) first, then each multi-token chunk contiguously, so the decode
rows of q are one slice and each prefill chunk another.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from scaleinfer.layers.attention import AttentionMetadata, PrefillMetadata
from scaleinfer.outputs import ScheduledSequence, SchedulerOutput


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    attn: AttentionMetadata
    sample_rows: torch.Tensor  # [num_sampled] int64: index of each sampled sequence's last token
    sampled: list[ScheduledSequence]  # in the order of sample_rows


def order_for_step(output: SchedulerOutput) -> list[ScheduledSequence]:
    decodes = [s for s in output.scheduled if s.num_tokens == 1]
    chunks = [s for s in output.scheduled if s.num_tokens > 1]
    return decodes + chunks


def build_step_inputs(output: SchedulerOutput, block_size: int, device: torch.device) -> StepInputs:
    seqs = order_for_step(output)
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    sample_rows: list[int] = []
    for seq in seqs:
        first = len(input_ids)
        pos = range(seq.start_pos, seq.context_len)
        input_ids.extend(seq.token_ids)
        positions.extend(pos)
        slots.extend(seq.block_table[p // block_size] * block_size + p % block_size for p in pos)
        if seq.sample:
            sample_rows.append(first + seq.num_tokens - 1)
    attn = _attention_metadata(seqs, slots, device)
    return StepInputs(
        input_ids=_tensor(input_ids, device),
        positions=_tensor(positions, device),
        attn=attn,
        sample_rows=_tensor(sample_rows, device),
        sampled=[s for s in seqs if s.sample],
    )


def _attention_metadata(seqs: list[ScheduledSequence], slots: list[int], device: torch.device) -> AttentionMetadata:
    decodes = [s for s in seqs if s.num_tokens == 1]
    block_tables = context_lens = None
    if decodes:
        block_tables = _padded_tables(decodes, device)
        context_lens = _tensor([s.context_len for s in decodes], device)
    return AttentionMetadata(
        slot_mapping=_tensor(slots, device),
        num_decodes=len(decodes),
        decode_block_tables=block_tables,
        decode_context_lens=context_lens,
        prefill=_prefill_metadata(seqs[len(decodes):], device),
    )


def _prefill_metadata(chunks: list[ScheduledSequence], device: torch.device) -> PrefillMetadata | None:
    if not chunks:
        return None
    lens = [s.num_tokens for s in chunks]
    return PrefillMetadata(
        block_tables=_padded_tables(chunks, device),
        query_start_loc=_tensor(list(itertools.accumulate(lens, initial=0)), device),
        start_pos=_tensor([s.start_pos for s in chunks], device),
        max_query_len=max(lens),
    )


def _padded_tables(seqs: list[ScheduledSequence], device: torch.device) -> torch.Tensor:
    width = max(len(s.block_table) for s in seqs)
    return _tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], device)


def _tensor(values: list, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)
