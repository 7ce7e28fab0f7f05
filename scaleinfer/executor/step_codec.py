"""A SchedulerOutput as a few bytes for the other ranks, and back.

Each step carries, per scheduled sequence, only what changes: the chunk's token ids, its start position, the
block-table entries added since the rank last heard of the sequence, whether it samples and how many tokens it
has generated. Sampling parameters, EOS ids and the prompt (the repetition penalty's context) travel once, the
first time a sequence is scheduled, and the workers keep them until the sequence finishes. The encoding is
msgspec's MessagePack of plain structs: no pickle, no Python objects rebuilt per sequence per step beyond
the ScheduledSequence the runner reads.

Block tables: the scheduler only appends to a sequence's live table until it rebinds it (preemption frees
the blocks and starts a new list). The encoder sends the tail past what it sent before while the list is the
same object, else the whole table, which the decoder then keeps as a new list: so on every rank a table is
the same list object exactly as long as it is on the engine's side (NextDecode relies on that identity).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import msgspec

from scaleinfer.outputs import GrammarBitmask, ScheduledSequence, SchedulerOutput
from scaleinfer.sampling_params import SamplingParams


class NewSequence(msgspec.Struct, array_like=True):
    request_id: str
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...]
    prompt_token_ids: bytes  # int64s: decoded into an array, which the garbage collector never walks


class Chunk(msgspec.Struct, array_like=True):
    request_id: str
    token_ids: list[int]
    start_pos: int
    table_from: int  # 0: table_tail is the whole table (a new list); else it extends the known one
    table_tail: list[int]
    sample: bool
    num_output_tokens: int


class StepMessage(msgspec.Struct, array_like=True):
    finished_request_ids: list[str]
    new: list[NewSequence]
    chunks: list[Chunk]
    num_preempted: int = 0
    grammar_bitmask: GrammarBitmask | None = None  # structured outputs: every rank masks its logits the same
    swap_out: list[tuple[int, int]] = []  # kv_offload: every rank moves its share of the same blocks
    swap_in: list[tuple[int, int]] = []


@dataclass(slots=True)
class _Sent:
    block_table: list[int]  # the engine's live list this rank last heard about
    num_sent: int


@dataclass(slots=True)
class _Known:
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...]
    prompt_token_ids: array  # of int64: a sequence of ints, as the runner reads it (its length, its values)
    block_table: list[int] = field(default_factory=list)


class StepEncoder:
    """Engine side; remembers what the other ranks were told."""

    def __init__(self) -> None:
        self._sent: dict[str, _Sent] = {}
        self._encoder = msgspec.msgpack.Encoder()

    def encode(self, output: SchedulerOutput) -> bytes:
        for request_id in output.finished_request_ids:
            self._sent.pop(request_id, None)
        new: list[NewSequence] = []
        chunks = [self._chunk(s, new) for s in output.scheduled]
        message = StepMessage(output.finished_request_ids, new, chunks, output.num_preempted, output.grammar_bitmask,
                              output.swap_out, output.swap_in)
        return self._encoder.encode(message)

    def _chunk(self, s: ScheduledSequence, new: list[NewSequence]) -> Chunk:
        sent, table = self._sent.get(s.request_id), s.block_table
        if sent is None:
            prompt = array("q", s.prompt_token_ids).tobytes()
            new.append(NewSequence(s.request_id, s.sampling_params, s.eos_token_ids, prompt))
            sent = self._sent[s.request_id] = _Sent(table, 0)
        elif sent.block_table is not table:
            sent.block_table, sent.num_sent = table, 0
        start, sent.num_sent = sent.num_sent, len(table)
        return Chunk(s.request_id, s.token_ids, s.start_pos, start, table[start:], s.sample, s.num_output_tokens)


class StepDecoder:
    """Worker side; keeps each unfinished sequence's parameters and block table."""

    def __init__(self) -> None:
        self._known: dict[str, _Known] = {}
        self._decoder = msgspec.msgpack.Decoder(StepMessage)

    def decode(self, payload: bytes) -> SchedulerOutput:
        message = self._decoder.decode(payload)
        for request_id in message.finished_request_ids:
            self._known.pop(request_id, None)
        for seq in message.new:
            prompt = array("q")
            prompt.frombytes(seq.prompt_token_ids)
            self._known[seq.request_id] = _Known(seq.sampling_params, tuple(seq.eos_token_ids), prompt)
        scheduled = [self._scheduled(chunk) for chunk in message.chunks]
        return SchedulerOutput(scheduled, message.finished_request_ids, message.num_preempted,
                               message.grammar_bitmask, message.swap_out, message.swap_in)

    def _scheduled(self, chunk: Chunk) -> ScheduledSequence:
        known = self._known[chunk.request_id]
        if chunk.table_from == 0:
            known.block_table = chunk.table_tail
        else:
            if len(known.block_table) != chunk.table_from:
                raise RuntimeError(f"block table of {chunk.request_id!r} has {len(known.block_table)} entries, "
                                   f"the step extends it from {chunk.table_from}")
            known.block_table.extend(chunk.table_tail)
        return ScheduledSequence(chunk.request_id, chunk.token_ids, chunk.start_pos, known.block_table, chunk.sample,
                                 known.sampling_params, chunk.num_output_tokens, known.eos_token_ids,
                                 known.prompt_token_ids)
