"""Continuous batching with one token budget per step (vLLM v1 style).

Every step spends up to max_num_batched_tokens over running sequences first, oldest first (a decode wants
1 token, an unfinished prefill the rest of its prompt, chunked to fit), then admits waiting sequences first
come, first served, with what is left. A prefill and a decode are the same thing here: compute the tokens
from num_computed_tokens on. When blocks run short the newest running sequence is preempted: its KV swapped
out to host memory where the block manager has a host tier and swapping it back costs less than recomputing it
(swap_cost.py), else dropped and recomputed. Readmission is the same either way: a waiting sequence starts from
the KV the block manager holds for it (all of it once swapped out, else a prefix-cache hit). schedule() and
update() alternate: the engine calls update with each schedule's output before the next.

Fairness follows from that order. A sequence is admitted only with budget left once every running one has
its tokens, so every running sequence advances every step (at most max_num_batched_tokens of them run), and
at most one is mid-prefill, the newest: every running decode is scheduled ahead of any prompt chunk. A long
prompt delays the decodes beside it only by the length of the steps it shares with them: while any running
sequence decodes, a step carries at most max_mixed_prefill_tokens prompt tokens (running prefills and admitted
ones alike; the rest is chunked into later steps), and with none decoding the whole budget goes to prompts.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from scaleinfer.config import SchedulerConfig
from scaleinfer.engine.block_manager import BlockManager
from scaleinfer.engine.sequence import Sequence, SequenceStatus
from scaleinfer.engine.structured_output import grammar_bitmask
from scaleinfer.engine.swap_cost import SwapCost
from scaleinfer.errors import InvalidRequestError, ScaleInferError
from scaleinfer.outputs import RunnerOutput, ScheduledSequence, SchedulerOutput
from scaleinfer.parallel.pipeline import MicroBatchPlan

logger = logging.getLogger(__name__)


class QueueFullError(ScaleInferError):
    """The waiting queue holds max_waiting requests; retry later (the server answers 503)."""


@dataclass(slots=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use
    prefix_cache_hit_rate: float  # hit tokens / queried tokens since start
    num_preempted: int  # since start
    num_swapped: int = 0  # of those, by swapping the KV out to host memory (the others recomputed)
    host_kv_cache_usage: float = 0.0  # fraction of host KV blocks in use (kv_offload)


def _is_decode(seq: Sequence, num_uncomputed: int) -> bool:
    """Whether seq, with num_uncomputed tokens left, decodes: only its last sampled token is left (0 in flight:
    the step samples). A fresh prompt's last token is a prompt token; a readmitted sequence with one token left
    (swapped back in, or all but it cached) decodes."""
    return num_uncomputed == 0 or (num_uncomputed == 1 and seq.num_output_tokens > 0)


@dataclass(slots=True)
class _StepBudget:
    num_tokens: int  # left to schedule this step
    num_prompt_tokens: int  # of those, prompt (prefill) tokens: max_mixed_prefill_tokens while a sequence decodes
    constrained: list[Sequence] = field(default_factory=list)  # that sample this step and have a grammar
    max_running: int = 1 << 62  # running sequences this micro-batch may still take (the pipeline's share)

    def chunk(self, seq: Sequence, num_uncomputed: int) -> int:
        """How many of seq's num_uncomputed tokens this step computes: a decode's one, or prompt tokens, chunked
        to the prompt budget too."""
        if _is_decode(seq, num_uncomputed):
            return min(num_uncomputed, self.num_tokens)
        return min(num_uncomputed, self.num_tokens, self.num_prompt_tokens)

    def spend(self, seq: Sequence, num_uncomputed: int, num_new_tokens: int) -> None:
        self.num_tokens -= num_new_tokens
        if not _is_decode(seq, num_uncomputed):
            self.num_prompt_tokens -= num_new_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 plan: MicroBatchPlan | None = None, swap_cost: SwapCost | None = None) -> None:
        """plan: the pipeline's micro-batches (parallel/pipeline.py); None: one micro-batch per step.
        swap_cost: whether a preempted sequence's KV goes to the block manager's host tier; None: never."""
        self.config = config
        self.block_manager = block_manager
        self.plan = plan or MicroBatchPlan()
        self.in_flight: set[str] = set()  # sequences of scheduled micro-batches not yet updated: skipped
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last one is preempted first
        self.requests: dict[str, Sequence] = {}  # every unfinished sequence, by request id
        self.finished_request_ids: list[str] = []  # since the last schedule()
        self.num_preempted = 0
        self.num_swapped = 0  # preemptions by swap
        self.swap_cost = swap_cost

    # ---- admission ------------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; raises if it could never be served or the queue is full."""
        self._check_servable(seq)
        num_waiting, max_waiting = len(self.waiting), self.config.max_waiting
        if max_waiting is not None and num_waiting >= max_waiting:
            raise QueueFullError(f"waiting queue is full: {num_waiting} requests, max_waiting={max_waiting}")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.requests[seq.request_id] = seq

    def _check_servable(self, seq: Sequence) -> None:
        num_prompt, max_tokens = seq.num_prompt_tokens, seq.sampling_params.max_tokens
        max_model_len, num_blocks = self.config.max_model_len, self.block_manager.num_blocks
        if seq.request_id in self.requests:
            raise InvalidRequestError(f"request id {seq.request_id!r} is already in use")
        if num_prompt == 0:
            raise InvalidRequestError(f"request {seq.request_id!r} has an empty prompt")
        check_fits(num_prompt, max_tokens, max_model_len, self.block_manager.block_size, num_blocks)

    # ---- schedule -------------------------------------------------------------------------------------

    def num_micro_batches(self) -> int:
        """How many scheduled micro-batches may be in flight now (1 without a pipeline)."""
        return self.plan.num_slots(self._num_pending_prompt(self.plan.prompt_tokens_to_count(1)) > 0)

    def _num_pending_prompt(self, limit: int) -> int:
        """Prompt tokens left to schedule outside the micro-batches in flight, counted up to limit."""
        total = 0
        for seq in itertools.chain(self.running, self.waiting):
            if total >= limit:
                break
            uncomputed = seq.num_uncomputed_tokens
            if seq.request_id not in self.in_flight and (uncomputed > 1 or seq.status is SequenceStatus.WAITING):
                total += uncomputed
        return total

    def schedule(self) -> SchedulerOutput:
        step_tokens = self.config.max_num_batched_tokens
        pending = self._num_pending_prompt(self.plan.prompt_tokens_to_count(step_tokens))
        share = self.plan.budget(step_tokens, len(self.running), pending)
        budget = _StepBudget(share.num_tokens, self._prompt_budget(pending), max_running=share.max_running)
        num_preempted_before = self.num_preempted
        scheduled = self._schedule_running(budget)
        num_preempted = self.num_preempted - num_preempted_before
        if num_preempted == 0:  # under memory pressure, admit nothing new
            scheduled += self._schedule_waiting(budget)
        finished_request_ids, self.finished_request_ids = self.finished_request_ids, []
        copies = self.block_manager.take_copies()
        return SchedulerOutput(scheduled, finished_request_ids, num_preempted, grammar_bitmask(budget.constrained),
                               copies.swap_out, copies.swap_in)

    def _prompt_budget(self, num_pending_prompt: int) -> int:
        """Prompt tokens this step may carry: max_mixed_prefill_tokens (at most the budget; a pipeline
        micro-batch's share of it) while any running sequence decodes, in this step or in flight, since its next
        token waits for the step; else the whole budget."""
        config = self.config
        if not any(_is_decode(seq, seq.num_uncomputed_tokens) for seq in self.running):
            return config.max_num_batched_tokens
        cap = min(config.max_mixed_prefill_tokens, config.max_num_batched_tokens)
        return self.plan.prompt_budget(cap, num_pending_prompt)

    def _schedule_running(self, budget: _StepBudget) -> list[ScheduledSequence]:
        scheduled: list[ScheduledSequence] = []
        index = 0
        while index < len(self.running) and budget.num_tokens > 0 and budget.max_running > 0:
            seq = self.running[index]
            index += 1
            if seq.request_id in self.in_flight:  # its micro-batch has not come back
                continue
            num_new_tokens = budget.chunk(seq, seq.num_uncomputed_tokens)
            if num_new_tokens == 0:  # a prefill, and the step's prompt tokens are spent
                continue
            if not self._allocate_or_preempt(seq, num_new_tokens):
                break  # seq was the last running sequence and is preempted itself
            scheduled.append(self._schedule_chunk(seq, num_new_tokens, budget))
            budget.max_running -= 1
        return scheduled

    def _allocate_or_preempt(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Allocate seq's slots, preempting from the back of running until they fit (never a sequence in flight:
        its micro-batch is writing its blocks)."""
        while not self.block_manager.allocate_slots(seq, num_new_tokens):
            victim = self._pop_victim()
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _pop_victim(self) -> Sequence:
        """The newest running sequence not in flight (seq, which asks, is one)."""
        for index in range(len(self.running) - 1, -1, -1):
            if self.running[index].request_id not in self.in_flight:
                return self.running.pop(index)
        raise AssertionError("every running sequence is in flight, the one being scheduled too")

    def _preempt(self, seq: Sequence) -> None:
        """Swap seq's KV out to host memory when that is cheaper than recomputing it and the host has room (it
        comes back whole on readmission), else drop it: the generated tokens are recomputed as prompt later."""
        if self._swaps(seq) and self.block_manager.swap_out(seq):
            self.num_swapped += 1
        else:
            self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)  # ahead of newer requests; victims keep their running order
        self.num_preempted += 1

    def _swaps(self, seq: Sequence) -> bool:
        return self.swap_cost is not None and self.swap_cost.prefers_swap(seq.num_computed_tokens)

    def _schedule_waiting(self, budget: _StepBudget) -> list[ScheduledSequence]:
        scheduled: list[ScheduledSequence] = []
        while self.waiting and budget.num_tokens > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            computed_blocks, num_cached_tokens = self.block_manager.get_computed_blocks(seq)
            num_new_tokens = budget.chunk(seq, seq.num_tokens - num_cached_tokens)
            if num_new_tokens == 0 or not self.block_manager.allocate_slots(seq, num_new_tokens, computed_blocks):
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            self._start_running(seq, num_cached_tokens)
            scheduled.append(self._schedule_chunk(seq, num_new_tokens, budget))
        return scheduled

    def _start_running(self, seq: Sequence, num_cached_tokens: int) -> None:
        seq.status = SequenceStatus.RUNNING
        seq.num_computed_tokens = num_cached_tokens
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = num_cached_tokens
            seq.first_scheduled_time = time.time()
        self.running.append(seq)

    def _schedule_chunk(self, seq: Sequence, num_new_tokens: int, budget: _StepBudget) -> ScheduledSequence:
        """Advance seq by num_new_tokens now (the step in flight computes them) and describe the chunk.

        Blocks filled by this chunk enter the prefix cache now, so a sequence admitted later in this
        same step may share them: the runner writes each layer's KV for the whole batch before that
        layer's attention reads it.
        """
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new_tokens
        self.block_manager.cache_full_blocks(seq, end)
        budget.spend(seq, seq.num_tokens - start, num_new_tokens)
        seq.num_computed_tokens = end
        self.in_flight.add(seq.request_id)
        all_token_ids = seq.all_token_ids
        if seq.grammar is not None and end == len(all_token_ids):
            budget.constrained.append(seq)
        # Positional, in ScheduledSequence's field order (request_id, token_ids, start_pos, block_table,
        # sample, sampling_params, num_output_tokens, eos_token_ids, prompt_token_ids): every sequence, every step.
        return ScheduledSequence(
            seq.request_id, all_token_ids[start:end], start,
            seq.block_ids,  # the live table: only appended to until free() rebinds it
            end == len(all_token_ids), seq.sampling_params, len(seq.output_token_ids), seq.eos_token_ids,
            seq.prompt_token_ids,
        )

    # ---- update and finish ----------------------------------------------------------------------------

    def update(self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput) -> list[Sequence]:
        """Append each sampled token and apply the stop rules; returns the sequences that got a token."""
        updated: list[Sequence] = []
        requests, sampled = self.requests, runner_output.sampled
        for scheduled in scheduler_output.scheduled:
            self.in_flight.discard(scheduled.request_id)
            seq = requests.get(scheduled.request_id)
            if not scheduled.sample or seq is None:  # mid-prefill, or aborted while the step ran
                continue
            token_id = sampled[seq.request_id].token_id
            seq.append_token(token_id)
            status, stop_reason = self._check_stop(seq, token_id)
            if status is not None:
                self.finish(seq.request_id, status, stop_reason)
            updated.append(seq)
        return updated

    def _check_stop(self, seq: Sequence, token_id: int) -> tuple[SequenceStatus | None, int | None]:
        """token_id: the one just appended. Called for every sequence every step: counts read once."""
        if seq.grammar is not None and (status := _advance_grammar(seq, token_id)) is not None:
            return status, None
        params, num_output_tokens = seq.sampling_params, len(seq.output_token_ids)
        if num_output_tokens >= params.min_tokens:
            if token_id in seq.eos_token_ids and not params.ignore_eos:
                return SequenceStatus.FINISHED_STOPPED, None
            if token_id in params.stop_token_ids:
                return SequenceStatus.FINISHED_STOPPED, token_id
        if num_output_tokens >= params.max_tokens or len(seq.all_token_ids) >= self.config.max_model_len:
            return SequenceStatus.FINISHED_LENGTH, None
        return None, None

    def finish(self, request_id: str, status: SequenceStatus, stop_reason: int | str | None = None) -> None:
        """End an unfinished sequence (a stop string, an abort); frees its blocks. Unknown ids are ignored."""
        assert status.is_finished, status
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return
        # A sequence in flight may end (an abort): its micro-batch's writes to the blocks freed here reach every
        # stage before those of any later micro-batch, to which the blocks may go.
        self.in_flight.discard(request_id)
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.block_hashes = []  # only a sequence that may run again needs its prefix-cache keys
        seq.status, seq.stop_reason = status, stop_reason
        self.finished_request_ids.append(request_id)

    def abort(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self.finish(request_id, SequenceStatus.FINISHED_ABORTED)

    # ---- introspection --------------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def get(self, request_id: str) -> Sequence | None:
        return self.requests.get(request_id)

    def stats(self) -> SchedulerStats:
        block_manager = self.block_manager
        return SchedulerStats(
            num_running=self.num_running, num_waiting=self.num_waiting, kv_cache_usage=block_manager.usage,
            prefix_cache_hit_rate=block_manager.prefix_cache_stats.hit_rate, num_preempted=self.num_preempted,
            num_swapped=self.num_swapped, host_kv_cache_usage=block_manager.host_usage)


def _advance_grammar(seq: Sequence, token_id: int) -> SequenceStatus | None:
    """Structured outputs: a complete grammar stops the sequence; a token it refuses (its row's mask was not
    applied) aborts it."""
    try:
        return SequenceStatus.FINISHED_STOPPED if seq.grammar.accept(token_id) else None
    except ValueError:
        logger.exception("sequence %s: the sampled token broke its grammar; aborting it", seq.request_id)
        return SequenceStatus.FINISHED_ABORTED


def check_fits(num_prompt: int, max_tokens: int, max_model_len: int, block_size: int, num_blocks: int) -> None:
    """Raise InvalidRequestError when a prompt with max_tokens to generate could never run: past the context, or
    needing more KV blocks than the cache has (the front refuses the same before a round trip to the core)."""
    if num_prompt + max_tokens > max_model_len:
        raise InvalidRequestError(f"prompt has {num_prompt} tokens and max_tokens is {max_tokens}; "
                                  f"the model's context is {max_model_len}")
    num_needed = -(-(num_prompt + max_tokens - 1) // block_size)  # the last sampled token is never fed back
    if num_needed > num_blocks:
        raise InvalidRequestError(f"prompt has {num_prompt} tokens and max_tokens is {max_tokens}, which "
                                  f"need {num_needed} KV blocks; the KV cache has {num_blocks}")
