"""EngineCore: the scheduler and the executor, and nothing of text. Tokenized requests in; per step, the new
token ids of each sequence out (EngineCoreOutput). LLMEngine runs it in its own process (a call); the server
runs it in a process of its own (engine/core_proc.py). The front detokenizes and decides stop strings.

step() = schedule -> execute -> update, in two halves a caller may run its own work between: launch() schedules
and queues the step on the device, complete() waits for its tokens and updates (the core loop sends the last
step's outputs and takes commands while the device runs the next). A request's own failure (its sampling
state, a read error of the step it ran in) fails that request alone; an error the device cannot recover from
(a failed rank, a CUDA fault, an out-of-memory that repeats, every step failing) raises
EngineUnrecoverableError: nothing can run any more.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scaleinfer.config import EngineConfig
from scaleinfer.engine.block_manager import BlockManager
from scaleinfer.engine.core_types import (
    ERROR_FAILED,
    CoreReady,
    EngineCoreOutput,
    EngineCoreRequest,
    EngineStats,
    SampledLogprobs,
)
from scaleinfer.engine.micro_batches import pipelined_steps
from scaleinfer.engine.prompt_logprobs import PromptLogprobsCollector
from scaleinfer.engine.scheduler import Scheduler
from scaleinfer.engine.sequence import Sequence
from scaleinfer.engine.structured_output import StructuredOutputs
from scaleinfer.engine.swap_cost import SwapCost
from scaleinfer.errors import EngineDeadError, InvalidRequestError, RankFailedError, RequestFailedError
from scaleinfer.outputs import RunnerOutput, SampledToken, SchedulerOutput
from scaleinfer.parallel.pipeline import micro_batch_plan
from scaleinfer.sampling_params import child_seed

if TYPE_CHECKING:
    from scaleinfer.weights.source import ModelSource

logger = logging.getLogger(__name__)

# Steps failing one after another: past this the failure is the engine's, not its requests'.
MAX_CONSECUTIVE_FAILED_STEPS = 3
# Words of the errors a device does not recover from (torch.AcceleratorError / RuntimeError messages).
_DEVICE_FAULTS = ("illegal memory access", "illegal instruction", "unspecified launch failure",
                  "device-side assert", "misaligned address", "CUDA error: an illegal", "ECC error",
                  "uncorrectable")


@dataclass(slots=True)
class LaunchedCoreStep:
    """A step scheduled and queued (EngineCore.launch); complete() takes its tokens. error: the launch raised."""

    scheduler_output: SchedulerOutput
    handle: Any = None  # the executor's
    error: Exception | None = None


class EngineUnrecoverableError(EngineDeadError):
    """A step failed in a way the device does not recover from; the engine can run nothing more."""


class EngineCore:
    def __init__(self, config: EngineConfig, progress: bool = True, source: ModelSource | None = None,
                 tokenizer_eos_token_id: int | None = None) -> None:
        """source: where weights come from when not config.model.model (init_inference passes an HF model)."""
        # The data plane is imported here so that the control plane stays importable without torch.
        from scaleinfer.executor import make_executor
        from scaleinfer.weights.source import resolve_model

        source = source or resolve_model(config.model.model, config.model.load_format)
        self.config, self.arch = config, source.arch
        self.max_model_len = max_model_len(config, source.arch.max_position_embeddings)
        self.executor = make_executor(config, source, self.max_model_len, progress)
        self.block_manager = BlockManager(self.executor.num_blocks, config.cache.block_size,
                                          config.cache.enable_prefix_caching, self.executor.num_host_blocks)
        scheduler_config = dataclasses.replace(config.scheduler, max_model_len=self.max_model_len)
        self.scheduler = Scheduler(scheduler_config, self.block_manager, micro_batch_plan(config.parallel),
                                   self._swap_cost())
        # The step's schedule and execute: the scheduler's and executor's own, or over pipeline micro-batches.
        self._schedule, self._execute = pipelined_steps(self.scheduler, self.executor)
        # Whether a step can be queued and its tokens taken later (launch/complete); else the step runs whole.
        self._launches = self.executor.num_stages == 1 and hasattr(self.executor, "launch")
        self.eos_token_ids = eos_token_ids(source.arch.eos_token_ids, tokenizer_eos_token_id)
        self.steps_ahead = getattr(self.executor, "steps_ahead", False)  # one process: see worker/step_ahead.py
        self.structured_outputs = StructuredOutputs.for_model(config.model, source, self.eos_token_ids)
        self.sequences: dict[str, list[Sequence]] = {}  # request id -> its n sequences, until all finish
        self.owners: dict[str, tuple[str, int]] = {}  # sequence id -> (request id, index)
        self.prompt_logprobs = PromptLogprobsCollector()  # sent with each request's first token
        self.stats_totals = EngineStats()
        self.num_failed_steps = 0  # one after another

    def _swap_cost(self) -> SwapCost | None:
        """What decides swap against recompute at preemption; None without a host tier."""
        if self.block_manager.num_host_blocks == 0:
            return None
        runner = self.executor.runner  # rank 0's: its KV dtype and device are every rank's
        return SwapCost.for_model(self.arch, self.config.cache, runner.kv_dtype.itemsize, runner.device.type)

    def ready(self) -> CoreReady:
        return CoreReady(max_model_len=self.max_model_len, num_blocks=self.block_manager.num_blocks,
                         block_size=self.config.cache.block_size, vocab_size=self.arch.vocab_size,
                         eos_token_ids=list(self.eos_token_ids))

    # ---- requests -------------------------------------------------------------------------------------

    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue its n sequences; raises InvalidRequestError or QueueFullError and leaves nothing behind."""
        request_id, params = request.request_id, request.sampling_params
        if request_id in self.sequences:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        params.check_token_ids(self.arch.vocab_size)
        check_prompt_token_ids(request.prompt_token_ids, self.arch.vocab_size)
        grammar = self.structured_outputs.compile(params.structured_outputs)  # None when unconstrained
        seqs = self.sequences[request_id] = []
        try:
            for index in range(params.n):
                self._add_sequence(request, index, seqs, grammar)
        except Exception:
            self.abort([request_id])
            raise
        self.stats_totals.num_prompt_tokens += len(request.prompt_token_ids)

    def _add_sequence(self, request: EngineCoreRequest, index: int, seqs: list[Sequence], grammar: Any) -> None:
        """grammar: the request's compiled structured-output grammar, or None."""
        params = request.sampling_params
        seq_id = request.request_id if params.n == 1 else f"{request.request_id}#{index}"
        if params.n > 1 and params.seed is not None:
            params = dataclasses.replace(params, seed=child_seed(params.seed, index))
        seq = Sequence(seq_id, request.prompt_token_ids, params, self.eos_token_ids, request.arrival_time,
                       grammar=self.structured_outputs.grammar(grammar))
        self.scheduler.add(seq)
        seqs.append(seq)
        self.owners[seq_id] = (request.request_id, index)

    def abort(self, request_ids: list[str], sequences: list[tuple[str, int]] = ()) -> None:
        """End these requests (all their sequences) and these (request id, index) sequences; unknown ids pass."""
        for request_id in request_ids:
            for seq in self.sequences.pop(request_id, []):
                self._end(seq)
        for request_id, index in sequences:
            seqs = self.sequences.get(request_id)
            if seqs is not None and index < len(seqs):
                self._end(seqs[index])
                self._forget_if_done(request_id)

    def _end(self, seq: Sequence) -> None:
        self.scheduler.abort([seq.request_id])
        self.owners.pop(seq.request_id, None)
        self.prompt_logprobs.drop(seq.request_id)

    def _forget_if_done(self, request_id: str) -> None:
        seqs = self.sequences.get(request_id, [])
        if all(seq.is_finished for seq in seqs):
            self.sequences.pop(request_id, None)
            for seq in seqs:
                self.owners.pop(seq.request_id, None)

    @property
    def launches(self) -> bool:
        """Whether launch() queues the step on the device and returns before it ends (one process, one stage);
        else complete() runs the whole step."""
        return self._launches

    def has_unfinished(self) -> bool:
        """With processes streaming weights together, True until every one of them is done (they step together)."""
        return self.executor.any_rank_busy(self.scheduler.has_unfinished())

    # ---- the loop -------------------------------------------------------------------------------------

    def step(self) -> list[EngineCoreOutput]:
        return self.complete(self.launch())

    def launch(self) -> LaunchedCoreStep:
        """Schedule a step and queue it on the executor without waiting for its tokens: the caller may do its own
        host work (send the last step's outputs, take commands) while the device runs it, then complete() it.
        Requests added or aborted in between join or leave from the next step on."""
        scheduler_output = self._schedule()
        # Nothing waits to join the running sequences: the next step is most likely these decodes again.
        scheduler_output.step_ahead = self.steps_ahead and self.scheduler.num_waiting == 0
        try:
            return LaunchedCoreStep(scheduler_output, handle=self._launch_step(scheduler_output))
        except Exception as exc:  # complete() fails the step as if it had raised there
            return LaunchedCoreStep(scheduler_output, error=exc)

    def complete(self, launched: LaunchedCoreStep) -> list[EngineCoreOutput]:
        """The launched step's outputs: its tokens appended, stop rules applied, failures reported."""
        scheduler_output = launched.scheduler_output
        try:
            if launched.error is not None:
                raise launched.error
            runner_output = self._complete_step(launched.handle)
        except Exception as exc:  # e.g. streamed weights unreadable: this step's requests fail, the rest go on
            self._raise_if_unrecoverable(exc)
            return self._fail_step(scheduler_output, exc)
        self.num_failed_steps = 0
        failed = self._fail_sequences(runner_output.failed)  # first: the scheduler appends them no token
        self.prompt_logprobs.record(runner_output.prompt_logprobs, self._awaits_first_token)
        updated = self.scheduler.update(scheduler_output, runner_output)
        self._count(scheduler_output, len(updated))
        outputs = [self._output(seq, runner_output.sampled[seq.request_id]) for seq in updated]
        for output in outputs:
            if output.finish_reason is not None:
                self._forget_if_done(output.request_id)
        return outputs + failed

    def _launch_step(self, scheduler_output: SchedulerOutput) -> Any:
        """Queue the step; what _complete_step takes. An executor that launches (one process, one stage) returns at
        once; any other runs the whole step in _complete_step."""
        return self.executor.launch(scheduler_output) if self._launches else scheduler_output

    def _complete_step(self, handle: Any) -> RunnerOutput:
        return self.executor.complete(handle) if self._launches else self._execute(handle)

    def _output(self, seq: Sequence, sampled: SampledToken) -> EngineCoreOutput:
        request_id, index = self.owners[seq.request_id]
        first = seq.num_output_tokens == 1
        output = EngineCoreOutput(
            request_id, index, [sampled.token_id], _logprobs(sampled), seq.finish_reason,
            seq.stop_reason, seq.num_cached_tokens if first else 0,
            seq.first_scheduled_time - seq.arrival_time if first and seq.first_scheduled_time else None)
        if first and index == 0 and seq.sampling_params.prompt_logprobs is not None:
            output.prompt_logprobs = self.prompt_logprobs.take(seq.request_id)
        return output

    def _awaits_first_token(self, seq_id: str) -> bool:
        """Whether this is a request's first sequence (the one whose prompt logprobs are sent), still in its
        prompt."""
        owner = self.owners.get(seq_id)
        return owner is not None and owner[1] == 0 and self.sequences[owner[0]][0].num_output_tokens == 0

    def _count(self, scheduler_output: SchedulerOutput, num_generated: int) -> None:
        totals = self.stats_totals
        totals.num_generation_tokens += num_generated
        for scheduled in scheduler_output.scheduled:
            totals.num_prompt_tokens_computed += max(
                0, min(scheduled.context_len, len(scheduled.prompt_token_ids)) - scheduled.start_pos)

    def _raise_if_unrecoverable(self, exc: Exception) -> None:
        self.num_failed_steps += 1
        if isinstance(exc, RankFailedError):  # the ranks are out of step: no request can run any more
            raise exc
        message = f"{type(exc).__name__}: {exc}"
        if any(fault in str(exc) for fault in _DEVICE_FAULTS):
            raise EngineUnrecoverableError(f"the device failed in a step: {message}") from exc
        if self.num_failed_steps >= MAX_CONSECUTIVE_FAILED_STEPS:
            raise EngineUnrecoverableError(f"{self.num_failed_steps} steps failed one after another, the last "
                                           f"with {message}") from exc

    def _fail_step(self, scheduler_output: SchedulerOutput, exc: Exception) -> list[EngineCoreOutput]:
        size = self.config.cache.block_size
        request_ids: dict[str, None] = {}
        self.block_manager.forget_copies(scheduler_output.swap_out, scheduler_output.swap_in)
        for scheduled in scheduler_output.scheduled:
            # Blocks this step was to fill entered the prefix cache when it was scheduled; their KV is not there.
            first, end = scheduled.start_pos // size, (scheduled.start_pos + scheduled.num_tokens) // size
            self.block_manager.uncache(scheduled.block_table[first:end])
            if scheduled.request_id in self.owners:
                request_ids[self.owners[scheduled.request_id][0]] = None
        return [self._fail(request_id, exc) for request_id in request_ids]

    def _fail_sequences(self, failed: dict[str, str]) -> list[EngineCoreOutput]:
        """The requests of the sequences the runner could not sample (sequence id -> why) fail alone."""
        errors: dict[str, Exception] = {}
        for seq_id, message in failed.items():
            if seq_id in self.owners:  # not aborted while the step ran
                errors.setdefault(self.owners[seq_id][0], RequestFailedError(f"sequence {seq_id}: {message}"))
        return [self._fail(request_id, exc) for request_id, exc in errors.items()]

    def _fail(self, request_id: str, exc: Exception) -> EngineCoreOutput:
        logger.error("request %s failed inside the engine; aborting it alone", request_id, exc_info=exc)
        self.abort([request_id])
        return EngineCoreOutput(request_id, 0, [], error=f"{type(exc).__name__}: {exc}", error_kind=ERROR_FAILED)

    def shutdown(self) -> None:
        """Stop the worker processes, if any (also done when the core is collected or at exit)."""
        self.executor.shutdown()

    # ---- introspection --------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        s, block_manager, totals = self.scheduler.stats(), self.block_manager, self.stats_totals
        return EngineStats(
            num_running=s.num_running, num_waiting=s.num_waiting, num_blocks=block_manager.num_blocks,
            num_used_blocks=block_manager.num_blocks - block_manager.num_free_blocks,
            kv_cache_usage=s.kv_cache_usage, prefix_cache_hit_rate=s.prefix_cache_hit_rate,
            num_preempted=s.num_preempted, num_swapped=s.num_swapped, num_host_blocks=block_manager.num_host_blocks,
            host_kv_cache_usage=s.host_kv_cache_usage, num_prompt_tokens=totals.num_prompt_tokens,
            num_prompt_tokens_computed=totals.num_prompt_tokens_computed,
            num_prompt_tokens_cached=block_manager.prefix_cache_stats.num_hit_tokens,
            num_generation_tokens=totals.num_generation_tokens)


def _logprobs(sampled: SampledToken) -> list[SampledLogprobs] | None:
    if sampled.logprob is None:
        return None
    return [SampledLogprobs(sampled.logprob, sampled.rank, sampled.top_token_ids, sampled.top_logprobs)]


def check_prompt_token_ids(prompt_token_ids: list[int], vocab_size: int) -> None:
    if not prompt_token_ids:
        raise InvalidRequestError("prompt is empty")
    bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"prompt token ids must be in [0, {vocab_size}), got {bad[:5]}")


def max_model_len(config: EngineConfig, model_len: int) -> int:
    asked = config.model.max_model_len
    if asked is not None and asked > model_len:
        raise InvalidRequestError(f"max_model_len={asked} exceeds the model's context of {model_len} tokens")
    return asked or model_len


def eos_token_ids(arch_eos: tuple[int, ...], tokenizer_eos: int | None) -> tuple[int, ...]:
    ids = list(arch_eos)
    if tokenizer_eos is not None and tokenizer_eos not in ids:
        ids.append(tokenizer_eos)
    return tuple(ids)
