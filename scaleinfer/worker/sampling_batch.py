"""Per-request sampling state on the device (seeded generators, penalty statistics) and the per-step
SamplingBatch."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from scaleinfer.layers.sampler import NEG_INF, LogitBias, PenaltyBatch, SamplingBatch, TokenBitmask
from scaleinfer.outputs import GrammarBitmask, ScheduledSequence
from scaleinfer.sampling_params import SamplingParams

FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass(slots=True)
class _Row:
    """One request's sampling values as the batch's tensors hold them, built apart from the other rows (and
    kept while the request lives): a value they cannot hold (a seed torch refuses, a token id past the
    vocabulary) fails its row alone."""

    params: SamplingParams | None  # what the values were built from (identity); None for a failed row
    temperature: float  # 0 = greedy
    top_p: float
    min_p: float  # 0 = off
    top_k: int  # in [0, vocab]: 0 = off
    num_logprobs: int  # -1 = none asked
    generator: torch.Generator | None
    logit_bias: list[tuple[int, float]]  # (token id < vocab, finite bias)
    penalties: tuple[float, float, float] | None  # presence, frequency, repetition; None = off
    min_tokens: int
    ban_ids: list[int]  # each < vocab: eos and stop tokens, banned while below min_tokens


# What a failed row samples with: an argmax over its untouched logits, whose token is thrown away.
_FAILED_ROW = _Row(None, 0.0, 1.0, 0.0, 0, -1, None, [], None, 0, [])


@dataclass(slots=True)
class _Composition:
    """What a batch's rows fix while the same requests sit in the same rows: built (and uploaded) once.

    Holds each row's SamplingParams, so identity (`is`) proves a later step's rows unchanged."""

    request_ids: list[str]
    params: list[SamplingParams]
    rows: list[_Row]
    failed: dict[str, str]  # request id -> why its row could not be built
    temperatures: torch.Tensor | None  # None when every row is greedy
    top_ps: torch.Tensor | None
    top_ks: torch.Tensor | None
    min_ps: torch.Tensor | None
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
    through pinned memory, asynchronously: a pageable copy would make the host wait for the forward.

    A row whose values cannot be built is named in the batch's `failed` and sampled as a greedy row with
    nothing applied; the other rows sample as if it were not there."""

    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.pin = device.type == "cuda"
        self.generators: dict[str, torch.Generator] = {}
        self.rows: dict[str, _Row] = {}  # by request id: built once per request, not once per composition
        self.default_generator = torch.Generator(device=device)
        self.default_generator.manual_seed(seed)
        self.penalty_state = PenaltyState(device, self._upload)
        self.composition: _Composition | None = None  # the last step's

    def drop(self, request_ids: list[str]) -> None:
        if request_ids:  # a reused request id must not find the finished one's generator
            self.composition = None
        for request_id in request_ids:
            self.generators.pop(request_id, None)
            self.rows.pop(request_id, None)
        self.penalty_state.drop(request_ids)

    def batch(self, seqs: list[ScheduledSequence], vocab_size: int,
              grammar_bitmask: GrammarBitmask | None = None) -> SamplingBatch:
        """grammar_bitmask: the step's structured-output masks (SchedulerOutput.grammar_bitmask), if any."""
        comp = self.composition
        if comp is None or not comp.matches(seqs):
            comp = self.composition = self._compose(seqs, vocab_size)
        penalties = comp.penalties
        return SamplingBatch(
            temperatures=comp.temperatures, top_ps=comp.top_ps, top_ks=comp.top_ks, generators=comp.generators,
            banned=self._banned(seqs, comp.rows) if comp.may_ban else None, num_logprobs=comp.num_logprobs,
            all_greedy=comp.temperatures is None,
            penalties=None if penalties is None else self.penalty_state.refresh(penalties),
            logit_bias=comp.logit_bias, failed=comp.failed, min_ps=comp.min_ps,
            allowed=None if grammar_bitmask is None else self._bitmask(seqs, grammar_bitmask),
        )

    def _bitmask(self, seqs: list[ScheduledSequence], bitmask: GrammarBitmask) -> TokenBitmask | None:
        """The bitmask's rows of these sampled sequences, on the device (one pinned upload, no wait)."""
        row_of = {s.request_id: row for row, s in enumerate(seqs)}
        pairs = [(row_of[rid], i) for i, rid in enumerate(bitmask.request_ids) if rid in row_of]
        if not pairs:
            return None
        words = torch.frombuffer(bytearray(bitmask.data), dtype=torch.int32).view(-1, bitmask.num_words)
        if len(pairs) < words.shape[0]:
            words = words[[i for _, i in pairs]]
        words = words.pin_memory() if self.pin else words
        return TokenBitmask(rows=self._upload([row for row, _ in pairs], torch.int64),
                            words=words.to(self.device, non_blocking=True))

    def record(self, batch: SamplingBatch, token_ids: torch.Tensor) -> None:
        """token_ids: [num_seqs], this step's samples for batch's rows (on the device; never read here)."""
        if batch.penalties is not None:
            self.penalty_state.record(batch.penalties, token_ids)

    def _compose(self, seqs: list[ScheduledSequence], vocab_size: int) -> _Composition:
        rows, failed = self._rows(seqs, vocab_size)
        greedy = all(r.temperature == 0 for r in rows)
        top_ks, top_ps, min_ps = [r.top_k for r in rows], [r.top_p for r in rows], [r.min_p for r in rows]
        return _Composition(
            request_ids=[s.request_id for s in seqs], params=[s.sampling_params for s in seqs], rows=rows,
            failed=failed,
            # A greedy batch is an argmax: it needs no temperatures or top-k/top-p (and has no generators).
            temperatures=None if greedy else self._upload([r.temperature for r in rows], torch.float32),
            top_ps=self._upload(top_ps, torch.float32) if not greedy and any(p < 1.0 for p in top_ps) else None,
            top_ks=self._upload([k or vocab_size for k in top_ks], torch.int64) if not greedy and any(top_ks)
            else None,
            min_ps=self._upload(min_ps, torch.float32) if not greedy and any(min_ps) else None,
            generators=[r.generator for r in rows], num_logprobs=max(r.num_logprobs for r in rows),
            logit_bias=self._triples([(i, t, b) for i, r in enumerate(rows) for t, b in r.logit_bias]),
            penalties=self.penalty_state.gather(seqs, [r.penalties for r in rows], vocab_size),
            may_ban=any(r.min_tokens > 0 and r.ban_ids for r in rows),
        )

    def _rows(self, seqs: list[ScheduledSequence], vocab_size: int) -> tuple[list[_Row], dict[str, str]]:
        rows, failed = [], {}
        for seq in seqs:
            row = self.rows.get(seq.request_id)
            if row is None or row.params is not seq.sampling_params:
                try:
                    row = self.rows[seq.request_id] = self._row(seq, vocab_size)
                except Exception as exc:  # this request's values alone: the rest of the batch samples
                    row = _FAILED_ROW
                    failed[seq.request_id] = f"its sampling state could not be built: {type(exc).__name__}: {exc}"
            rows.append(row)
        return rows, failed

    def _row(self, seq: ScheduledSequence, vocab_size: int) -> _Row:
        """Raises for a value the batch's tensors cannot hold; the generator is made last, so a failed row
        leaves nothing behind."""
        p = seq.sampling_params
        temperature = _finite("temperature", p.temperature)
        logprobs = -1 if p.logprobs is None else _int_in("logprobs", p.logprobs, 0, vocab_size)
        bias = [(t, _finite("logit_bias", b)) for t, b in p.logit_bias.items()]
        _check_token_ids("logit_bias", [t for t, _ in bias], vocab_size)
        ban_ids = ([] if p.ignore_eos else list(seq.eos_token_ids)) + p.stop_token_ids
        _check_token_ids("stop_token_ids", ban_ids, vocab_size)
        penalties = None if not p.has_penalties else (
            _finite("presence_penalty", p.presence_penalty), _finite("frequency_penalty", p.frequency_penalty),
            _finite("repetition_penalty", p.repetition_penalty))
        row = _Row(
            params=p, temperature=temperature, top_p=_finite("top_p", p.top_p), min_p=_finite("min_p", p.min_p),
            top_k=min(_int_in("top_k", p.top_k, 0, None), vocab_size),  # past the vocabulary: every token
            num_logprobs=logprobs, generator=None, logit_bias=bias, penalties=penalties,
            min_tokens=_int_in("min_tokens", p.min_tokens, 0, None), ban_ids=ban_ids,
        )
        if temperature != 0 and p.seed is not None:
            row.generator = self._generator(seq.request_id, p.seed)
        return row

    def _generator(self, request_id: str, seed: int) -> torch.Generator:
        if request_id not in self.generators:
            gen = torch.Generator(device=self.device)
            try:
                gen.manual_seed(seed)
            except (TypeError, ValueError, RuntimeError, OverflowError) as exc:  # outside [-2**63, 2**64 - 1]
                raise ValueError(f"seed={seed!r}: {exc}") from exc
            self.generators[request_id] = gen
        return self.generators[request_id]

    def _banned(self, seqs: list[ScheduledSequence], rows: list[_Row]) -> LogitBias | None:
        """This step's banned (row, token) pairs as a bias of -inf; None when no row bans any.
        Before min_tokens, neither eos nor a stop token may end the sequence."""
        return self._triples([(i, t, NEG_INF) for i, (seq, row) in enumerate(zip(seqs, rows))
                              if seq.num_output_tokens < row.min_tokens for t in row.ban_ids])

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

    def gather(self, seqs: list[ScheduledSequence], values: list[tuple[float, float, float] | None],
               vocab_size: int) -> PenaltyBatch | None:
        """The statistics of the rows with penalties (values[row]: presence, frequency, repetition, or None),
        copied out of the buffers; None when no row has any."""
        rows = [row for row, v in enumerate(values) if v is not None]
        if not rows:
            return None
        slots = self.upload([self._slot(seqs[row], vocab_size) for row in rows], torch.int64)
        penalties = self.upload([values[row] for row in rows], torch.float32)  # [num_penalized, 3]
        return PenaltyBatch(
            rows=self.upload(rows, torch.int64), slots=slots,
            output_counts=self.output_counts.index_select(0, slots),
            prompt_mask=self.prompt_mask.index_select(0, slots),
            presence=penalties[:, 0], frequency=penalties[:, 1], repetition=penalties[:, 2])

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


def _finite(name: str, value: object) -> float:
    """value as a float32 tensor holds it; raises unless it is a finite real number there."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} is not a number")
    try:
        as_float = float(value)
    except OverflowError:
        as_float = math.inf
    if not abs(as_float) <= FLOAT32_MAX:
        raise ValueError(f"{name}={value!r} is not finite in float32")
    return as_float


def _int_in(name: str, value: object, low: int, high: int | None) -> int:
    """value, an integer in [low, high] (no upper bound when high is None)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise ValueError(f"{name}={value!r} is not an integer in [{low}, {'inf' if high is None else high}]")
    return value


def _check_token_ids(name: str, token_ids: list[int], vocab_size: int) -> None:
    bad = [t for t in token_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{name} token ids {bad[:5]} are not in [0, {vocab_size})")
