"""LLMEngine: step() = schedule -> execute -> update. Requests in, RequestOutputs out.

A request with n > 1 becomes n sequences that share the prompt (the prefix cache shares its KV).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scaleinfer.config import EngineConfig
from scaleinfer.engine.block_manager import BlockManager
from scaleinfer.engine.detokenizer import IncrementalDetokenizer
from scaleinfer.engine.request_state import RequestState, SequenceState
from scaleinfer.engine.scheduler import Scheduler
from scaleinfer.engine.sequence import Sequence, SequenceStatus
from scaleinfer.errors import InvalidRequestError, RankFailedError, RequestFailedError
from scaleinfer.outputs import RequestOutput, RunnerOutput, SchedulerOutput
from scaleinfer.sampling_params import SamplingParams, child_seed

if TYPE_CHECKING:
    from scaleinfer.weights.source import ModelSource

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_blocks: int
    num_used_blocks: int
    kv_cache_usage: float  # 0..1
    prefix_cache_hit_rate: float  # 0..1, over all prompt tokens looked up
    num_preempted: int
    num_prompt_tokens: int  # totals since start
    num_generation_tokens: int


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: bool = True, source: ModelSource | None = None) -> None:
        """source: where weights come from when not config.model.model (init_inference passes an HF model)."""
        # The data plane is imported here so that the control plane stays importable without torch.
        from scaleinfer.executor import make_executor
        from scaleinfer.tokenizer import tokenizer_for
        from scaleinfer.weights.source import resolve_model

        self.config = config
        source = source or resolve_model(config.model.model, config.model.load_format)
        self.model_name = config.model.model
        self.model_path = source.path
        self.arch = source.arch
        self.tokenizer = None if config.model.skip_tokenizer_init else tokenizer_for(source, config.model)
        self.max_model_len = _max_model_len(config, source.arch.max_position_embeddings)
        self.executor = make_executor(config, source, self.max_model_len, progress)
        self.runner = self.executor.runner  # rank 0's, in this process
        self.block_manager = BlockManager(self.executor.num_blocks, config.cache.block_size,
                                          config.cache.enable_prefix_caching)
        scheduler_config = dataclasses.replace(config.scheduler, max_model_len=self.max_model_len)
        self.scheduler = Scheduler(scheduler_config, self.block_manager)
        self.eos_token_ids = _eos_token_ids(source.arch.eos_token_ids, self.tokenizer)
        self.requests: dict[str, RequestState] = {}
        self.children: dict[str, tuple[RequestState, SequenceState]] = {}  # sequence id -> owner
        self.num_prompt_tokens = self.num_generation_tokens = 0

    # ---- requests -------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Queue a request; raises InvalidRequestError (or QueueFullError) and leaves nothing behind."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        params.check_token_ids(self.arch.vocab_size)
        prompt_text, prompt_token_ids = self._tokenize(prompt)
        state = RequestState(request_id, prompt_text, prompt_token_ids, children=[])
        try:
            for index in range(params.n):
                self._add_sequence(state, index, params)
        except Exception:
            self.scheduler.abort([child.seq.request_id for child in state.children])
            self._forget(state)
            raise
        self.requests[request_id] = state
        self.num_prompt_tokens += len(prompt_token_ids)

    def _add_sequence(self, state: RequestState, index: int, params: SamplingParams) -> None:
        seq_id = state.request_id if params.n == 1 else f"{state.request_id}#{index}"
        if params.n > 1 and params.seed is not None:
            params = dataclasses.replace(params, seed=child_seed(params.seed, index))
        seq = Sequence(seq_id, state.prompt_token_ids, params, self.eos_token_ids)
        child = SequenceState(seq, self._detokenizer(state.prompt_token_ids, params),
                              logprobs=[] if params.logprobs is not None else None,
                              cumulative_logprob=0.0 if params.logprobs is not None else None)
        self.scheduler.add(seq)
        state.children.append(child)
        self.children[seq_id] = (state, child)

    def _detokenizer(self, prompt_token_ids: list[int], params: SamplingParams) -> IncrementalDetokenizer | None:
        if self.tokenizer is not None:
            return IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)
        if params.stop:
            raise InvalidRequestError(f"stop strings {params.stop} need a tokenizer; this engine skipped it")
        return None

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            if self.tokenizer is None:
                raise InvalidRequestError("text prompts need a tokenizer; pass token ids (skip_tokenizer_init)")
            return prompt, self.tokenizer.encode(prompt)
        vocab_size = self.arch.vocab_size
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab_size}), got {bad[:5]}")
        return None, list(prompt)

    def abort_request(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            state = self.requests.get(request_id)
            if state is not None:
                self.scheduler.abort([child.seq.request_id for child in state.children])
                self._forget(state)

    def _forget(self, state: RequestState) -> None:
        self.requests.pop(state.request_id, None)
        for child in state.children:
            self.children.pop(child.seq.request_id, None)

    def has_unfinished_requests(self) -> bool:
        """With processes streaming weights together, True until every one of them is done (they step together)."""
        return self.executor.any_rank_busy(self.scheduler.has_unfinished())

    # ---- the loop -------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        scheduler_output = self.scheduler.schedule()
        try:
            runner_output = self.executor.execute(scheduler_output)
        except RankFailedError:  # the ranks are out of step: no request can run any more
            raise
        except Exception as exc:  # e.g. streamed weights unreadable: this step's requests fail, the rest go on
            return self._fail_step(scheduler_output, exc)
        failed = self._fail_sequences(runner_output.failed)  # first: the scheduler appends them no token
        updated = self.scheduler.update(scheduler_output, runner_output)
        self.num_generation_tokens += len(updated)
        return self._process(updated, runner_output) + failed

    def _process(self, updated: list[Sequence], runner_output: RunnerOutput) -> list[RequestOutput]:
        touched: dict[str, RequestState] = {}
        failed: dict[str, RequestOutput] = {}
        now = time.time()
        for seq in updated:
            state, child = self.children[seq.request_id]
            if state.request_id in failed:
                continue
            try:
                self._process_token(seq, child, runner_output)
            except Exception as exc:  # one request's bad state must not end the others
                failed[state.request_id] = self._fail(state, exc)
                continue
            state.metrics.first_token_time = state.metrics.first_token_time or now
            touched[state.request_id] = state
        outputs = [self._emit(state, now) for rid, state in touched.items() if rid not in failed]
        return outputs + list(failed.values())

    def _fail_step(self, scheduler_output: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        size = self.config.cache.block_size
        failed: dict[str, RequestState] = {}
        for scheduled in scheduler_output.scheduled:
            # Blocks this step was to fill entered the prefix cache when it was scheduled; their KV is not there.
            first, end = scheduled.start_pos // size, (scheduled.start_pos + scheduled.num_tokens) // size
            self.block_manager.uncache(scheduled.block_table[first:end])
            if scheduled.request_id in self.children:
                state = self.children[scheduled.request_id][0]
                failed[state.request_id] = state
        return [self._fail(state, exc) for state in failed.values()]

    def _fail_sequences(self, failed: dict[str, str]) -> list[RequestOutput]:
        """The requests of the sequences the runner could not sample (sequence id -> why) fail alone."""
        states = {}
        for seq_id, message in failed.items():
            if seq_id in self.children:  # not aborted while the step ran
                state = self.children[seq_id][0]
                states.setdefault(state.request_id, (state, RequestFailedError(f"sequence {seq_id}: {message}")))
        return [self._fail(state, exc) for state, exc in states.values()]

    def _process_token(self, seq: Sequence, child: SequenceState, runner_output: RunnerOutput) -> None:
        child.record(runner_output.sampled[seq.request_id], self.tokenizer)
        stop = child.advance(seq.last_token_id)
        if stop is not None:
            self._stop_on_string(seq, stop)

    def _fail(self, state: RequestState, exc: Exception) -> RequestOutput:
        logger.error("request %s failed inside the engine; aborting it alone", state.request_id, exc_info=exc)
        self.scheduler.abort([child.seq.request_id for child in state.children])
        self._forget(state)
        output = state.output()
        output.finished, output.error = True, f"{type(exc).__name__}: {exc}"
        return output

    def _stop_on_string(self, seq: Sequence, stop: str) -> None:
        if seq.is_finished:  # the same token also hit a length limit: the stop string is the reason
            seq.status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, stop
        else:
            self.scheduler.finish(seq.request_id, SequenceStatus.FINISHED_STOPPED, stop)

    def _emit(self, state: RequestState, now: float) -> RequestOutput:
        state.metrics.num_cached_tokens = state.children[0].seq.num_cached_tokens
        output = state.output()  # output.metrics is state.metrics: the finish time below reaches it
        if output.finished:
            state.metrics.finished_time = now
            self._forget(state)
        return output

    def shutdown(self) -> None:
        """Stop the worker processes, if any (also done when the engine is collected or at exit)."""
        self.executor.shutdown()

    # ---- introspection --------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        s = self.scheduler.stats()
        num_blocks = self.block_manager.num_blocks
        return EngineStats(
            num_running=s.num_running, num_waiting=s.num_waiting, num_blocks=num_blocks,
            num_used_blocks=num_blocks - self.block_manager.num_free_blocks, kv_cache_usage=s.kv_cache_usage,
            prefix_cache_hit_rate=s.prefix_cache_hit_rate, num_preempted=s.num_preempted,
            num_prompt_tokens=self.num_prompt_tokens, num_generation_tokens=self.num_generation_tokens,
        )


def _max_model_len(config: EngineConfig, model_len: int) -> int:
    asked = config.model.max_model_len
    if asked is not None and asked > model_len:
        raise InvalidRequestError(f"max_model_len={asked} exceeds the model's context of {model_len} tokens")
    return asked or model_len


def _eos_token_ids(arch_eos: tuple[int, ...], tokenizer: Any) -> tuple[int, ...]:
    ids = list(arch_eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return tuple(ids)
