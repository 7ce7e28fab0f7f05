"""Per-request sampling state on the device (seeded generators, penalty statistics) and the per-step
SamplingBatch."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from scaleinfer.layers.sampler import NEG_INF, LogitBias, PenaltyBatch, SamplingBatch
from scaleinfer.outputs import ScheduledSequence
from scaleinfer.sampling_params import SamplingParams


@dataclass(slots=True)
class _Composition:
    """What a batch's rows fix while the same requests sit in the same rows: built (and uploaded) once.

    Holds each row's SamplingParams, so identity (`is`) proves a later step's rows unchanged."""

    request_ids: list[str]
    params: list[SamplingParams]
    temperatures: torch.Tensor | None  # None when every row is greedy
    top_ps: torch.Tensor | None
    top_ks: torch.Tensor | None
    generators: list[torch.Generator | None]
    num_logprobs: int
    logit_bias: LogitBias | None
    penalties: PenaltyBatch | None  # its statistics are refreshed every step
    may_ban: bool  # some row has min_tokens, so eos may be banned this step

    def matches(self, seqs: list[ScheduledSequence]) -> bool:
        return len(seqs) == len(self.params) and all(
            s.request_id == rid and s.sampling_params is p for s, rid, p in zip(seqs, self.request_ids, self.params))


class SamplingState:
    """Keeps each seeded request's generator across steps, so its draws ignore the rest of the batch, and
    the token statistics of the requests with penalties.

    The per-row tensors of a step are built once per batch composition (the same requests in the same
    rows): a decode loop over an unchanged batch copies nothing to the device. What must be copied goes
    through pinned memory, asynchronously: a pageable copy would make the host wait for the forward."""

    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.pin = device.type == "cuda"
        self.generators: dict[str, torch.Generator] = {}
        self.default_generator = torch.Generator(device=device)
        self.default_generator.manual_seed(seed)
        self.penalty_state = PenaltyState(device, self._upload)
        self.composition: _Composition | None = None  # the last step's

    def drop(self, request_ids: list[str]) -> None:
        if request_ids:  # a reused request id must not find the finished one's generator
            self.composition = None
        for request_id in request_ids:
            self.generators.pop(request_id, None)
        self.penalty_state.drop(request_ids)

    def batch(self, seqs: list[ScheduledSequence], vocab_size: int) -> SamplingBatch:
        comp = self.composition
        if comp is None or not comp.matches(seqs):
            comp = self.composition = self._compose(seqs, vocab_size)
        penalties = comp.penalties
        return SamplingBatch(
            temperatures=comp.temperatures, top_ps=comp.top_ps, top_ks=comp.top_ks, generators=comp.generators,
            banned=self._banned(seqs) if comp.may_ban else None, num_logprobs=comp.num_logprobs,
            all_greedy=comp.temperatures is None,
            penalties=None if penalties is None else self.penalty_state.refresh(penalties),
            logit_bias=comp.logit_bias,
        )

    def record(self, batch: SamplingBatch, token_ids: torch.Tensor) -> None:
        """token_ids: [num_seqs], this step's samples for batch's rows (on the device; never read here)."""
        if batch.penalties is not None:
            self.penalty_state.record(batch.penalties, token_ids)

    def _compose(self, seqs: list[ScheduledSequence], vocab_size: int) -> _Composition:
        params = [s.sampling_params for s in seqs]
        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        greedy = all(p.temperature == 0 for p in params)
        top_ks, top_ps = [p.top_k for p in params], [p.top_p for p in params]
        return _Composition(
            request_ids=[s.request_id for s in seqs], params=params,
            # A greedy batch is an argmax: it needs no temperatures, top-k/top-p or generators.
            temperatures=None if greedy else self._upload([p.temperature for p in params], torch.float32),
            top_ps=self._upload(top_ps, torch.float32) if not greedy and any(p < 1.0 for p in top_ps) else None,
            top_ks=self._top_ks(top_ks) if not greedy and any(top_ks) else None,
            generators=[None] * len(seqs) if greedy else [self._generator(s) for s in seqs],
            num_logprobs=max(logprobs, default=-1),
            logit_bias=self._logit_bias(seqs),
            penalties=self.penalty_state.gather(seqs, vocab_size),
            may_ban=any(p.min_tokens > 0 for p in params),
        )

    def _generator(self, seq: ScheduledSequence) -> torch.Generator | None:
        seed = seq.sampling_params.seed
        if seed is None or seq.sampling_params.temperature == 0:
            return None
        if seq.request_id not in self.generators:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            self.generators[seq.request_id] = gen
        return self.generators[seq.request_id]

    def _logit_bias(self, seqs: list[ScheduledSequence]) -> LogitBias | None:
        triples = [(row, token_id, bias) for row, seq in enumerate(seqs)
                   for token_id, bias in seq.sampling_params.logit_bias.items()]
        return self._triples(triples)

    def _banned(self, seqs: list[ScheduledSequence]) -> LogitBias | None:
        """This step's banned (row, token) pairs as a bias of -inf; None when no row bans any."""
        return self._triples([(row, token_id, NEG_INF) for row, seq in enumerate(seqs) for token_id in _banned(seq)])

    def _triples(self, triples: list[tuple[int, int, float]]) -> LogitBias | None:
        if not triples:
            return None
        rows, token_ids, biases = zip(*triples)
        return LogitBias(self._upload(rows, torch.int64), self._upload(token_ids, torch.int64),
                         self._upload(biases, torch.float32))

    def _upload(self, values, dtype: torch.dtype) -> torch.Tensor:
        """A host list on the device without making the host wait: packed into pinned memory (torch's
        caching host allocator keeps the block until its copy is done) and copied asynchronously."""
        return torch.tensor(values, dtype=dtype, pin_memory=self.pin).to(self.device, non_blocking=True)

    def _top_ks(self, values: list[int]) -> torch.Tensor:
        big = 1 << 30  # top_k == 0 means every token
        return self._upload([k or big for k in values], torch.int64)


class PenaltyState:
    """Token statistics of the requests with penalties: one row of two device buffers per request.

    output_counts[slot, t] counts token t among the request's generated tokens; prompt_mask[slot, t] says
    t is in its prompt. A request takes a slot when first sampled and gives it back when it finishes; the
    counts grow on the device from each step's samples (record) and are never read back to the host.
    Preemption keeps the slot: the tokens generated before it are still the request's.
    """

    def __init__(self, device: torch.device, upload: Callable[[list, torch.dtype], torch.Tensor]) -> None:
        self.device = device
        self.upload = upload  # host list -> device tensor
        self.one = torch.ones(1, dtype=torch.int32, device=device)
        self.slots: dict[str, int] = {}
        self.free_slots: list[int] = []
        self.output_counts = torch.zeros(0, 0, dtype=torch.int32, device=device)  # [capacity, vocab]
        self.prompt_mask = torch.zeros(0, 0, dtype=torch.bool, device=device)  # [capacity, vocab]

    def drop(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            slot = self.slots.pop(request_id, None)
            if slot is not None:
                self.free_slots.append(slot)

    def gather(self, seqs: list[ScheduledSequence], vocab_size: int) -> PenaltyBatch | None:
        """The statistics of the rows with penalties, copied out of the buffers; None when no row has any."""
        rows = [row for row, seq in enumerate(seqs) if seq.sampling_params.has_penalties]
        if not rows:
            return None
        slots = self.upload([self._slot(seqs[row], vocab_size) for row in rows], torch.int64)
        params = [seqs[row].sampling_params for row in rows]
        values = self.upload([[p.presence_penalty, p.frequency_penalty, p.repetition_penalty] for p in params],
                             torch.float32)  # [num_penalized, 3]
        return PenaltyBatch(
            rows=self.upload(rows, torch.int64), slots=slots,
            output_counts=self.output_counts.index_select(0, slots),
            prompt_mask=self.prompt_mask.index_select(0, slots),
            presence=values[:, 0], frequency=values[:, 1], repetition=values[:, 2])

    def refresh(self, penalties: PenaltyBatch) -> PenaltyBatch:
        """penalties (gathered at an earlier step, same rows) with this step's output counts. The buffers
        grow only while gathering, and a slot's prompt row is fixed while its request lives."""
        return dataclasses.replace(penalties, output_counts=self.output_counts.index_select(0, penalties.slots))

    def record(self, penalties: PenaltyBatch, token_ids: torch.Tensor) -> None:
        self.output_counts.index_put_((penalties.slots, token_ids[penalties.rows]), self.one, accumulate=True)

    def _slot(self, seq: ScheduledSequence, vocab_size: int) -> int:
        slot = self.slots.get(seq.request_id)
        if slot is None:
            slot = self._take_slot(vocab_size)
            self.output_counts[slot] = 0
            self.prompt_mask[slot] = False
            prompt = self.upload(seq.prompt_token_ids, torch.int64)
            self.prompt_mask[slot, prompt] = True
            self.slots[seq.request_id] = slot
        return slot

    def _take_slot(self, vocab_size: int) -> int:
        if not self.free_slots:
            self._grow(vocab_size)
        return self.free_slots.pop()

    def _grow(self, vocab_size: int) -> None:
        """Double the capacity (at least 8 rows), keeping the rows in use."""
        old = self.output_counts.shape[0]
        new = max(8, 2 * old)
        counts = torch.zeros(new, vocab_size, dtype=torch.int32, device=self.device)
        mask = torch.zeros(new, vocab_size, dtype=torch.bool, device=self.device)
        if old:
            counts[:old], mask[:old] = self.output_counts, self.prompt_mask
        self.output_counts, self.prompt_mask = counts, mask
        self.free_slots.extend(range(new - 1, old - 1, -1))


def _banned(seq: ScheduledSequence) -> list[int]:
    # Before min_tokens, neither eos nor a stop token may end the sequence.
    if seq.num_output_tokens >= seq.sampling_params.min_tokens:
        return []
    eos = [] if seq.sampling_params.ignore_eos else list(seq.eos_token_ids)
    return eos + seq.sampling_params.stop_token_ids
