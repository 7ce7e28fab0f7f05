"""Per-request sampling state on the device (seeded generators, penalty statistics) and the per-step
SamplingBatch."""

from __future__ import annotations

import torch

from scaleinfer.layers.sampler import LogitBias, PenaltyBatch, SamplingBatch
from scaleinfer.outputs import ScheduledSequence


class SamplingState:
    """Keeps each seeded request's generator across steps, so its draws ignore the rest of the batch, and
    the token statistics of the requests with penalties."""

    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.generators: dict[str, torch.Generator] = {}
        self.default_generator = torch.Generator(device=device)
        self.default_generator.manual_seed(seed)
        self.penalty_state = PenaltyState(device)

    def drop(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.generators.pop(request_id, None)
        self.penalty_state.drop(request_ids)

    def batch(self, seqs: list[ScheduledSequence], vocab_size: int) -> SamplingBatch:
        params = [s.sampling_params for s in seqs]
        top_ks = [p.top_k for p in params]
        top_ps = [p.top_p for p in params]
        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        return SamplingBatch(
            temperatures=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=self.device),
            top_ps=self._floats(top_ps) if any(p < 1.0 for p in top_ps) else None,
            top_ks=self._top_ks(top_ks) if any(top_ks) else None,
            generators=[self._generator(s) for s in seqs],
            banned_token_ids=[_banned(s) for s in seqs],
            num_logprobs=max(logprobs, default=-1),
            all_greedy=all(p.temperature == 0 for p in params),
            penalties=self.penalty_state.gather(seqs, vocab_size),
            logit_bias=self._logit_bias(seqs),
        )

    def record(self, batch: SamplingBatch, token_ids: torch.Tensor) -> None:
        """token_ids: [num_seqs], this step's samples for batch's rows (on the device; never read here)."""
        if batch.penalties is not None:
            self.penalty_state.record(batch.penalties, token_ids)

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
        if not triples:
            return None
        rows, token_ids, biases = zip(*triples)
        return LogitBias(self._ints(rows), self._ints(token_ids), self._floats(biases))

    def _floats(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def _ints(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def _top_ks(self, values: list[int]) -> torch.Tensor:
        big = 1 << 30  # top_k == 0 means every token
        return torch.tensor([k or big for k in values], dtype=torch.int64, device=self.device)


class PenaltyState:
    """Token statistics of the requests with penalties: one row of two device buffers per request.

    output_counts[slot, t] counts token t among the request's generated tokens; prompt_mask[slot, t] says
    t is in its prompt. A request takes a slot when first sampled and gives it back when it finishes; the
    counts grow on the device from each step's samples (record) and are never read back to the host.
    Preemption keeps the slot: the tokens generated before it are still the request's.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
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
        slots = torch.tensor([self._slot(seqs[row], vocab_size) for row in rows], dtype=torch.int64,
                             device=self.device)
        params = [seqs[row].sampling_params for row in rows]
        values = torch.tensor([[p.presence_penalty, p.frequency_penalty, p.repetition_penalty] for p in params],
                              dtype=torch.float32, device=self.device)  # [num_penalized, 3]
        return PenaltyBatch(
            rows=torch.tensor(rows, dtype=torch.int64, device=self.device), slots=slots,
            output_counts=self.output_counts.index_select(0, slots),
            prompt_mask=self.prompt_mask.index_select(0, slots),
            presence=values[:, 0], frequency=values[:, 1], repetition=values[:, 2])

    def record(self, penalties: PenaltyBatch, token_ids: torch.Tensor) -> None:
        one = torch.ones(1, dtype=torch.int32, device=self.device)
        self.output_counts.index_put_((penalties.slots, token_ids[penalties.rows]), one, accumulate=True)

    def _slot(self, seq: ScheduledSequence, vocab_size: int) -> int:
        slot = self.slots.get(seq.request_id)
        if slot is None:
            slot = self._take_slot(vocab_size)
            self.output_counts[slot] = 0
            self.prompt_mask[slot] = False
            prompt = torch.tensor(seq.prompt_token_ids, dtype=torch.int64, device=self.device)
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
