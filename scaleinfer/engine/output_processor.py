"""The front's half of every request, for both paths (LLMEngine's call, the server's core process): the
EngineCoreOutputs of a step in, RequestOutputs out. Detokenization, stop strings, logprob formatting and
RequestOutput assembly happen here and nowhere else; eos, stop token ids and length are the core's.

A stop string ends its sequence here; process() names those sequences in `to_stop` so that the caller aborts
them in the core (which may have sampled further tokens meanwhile: they are dropped). A request whose
output cannot be processed (its own state broke) fails alone: it comes back finished with `error`, and
its id is in `to_abort`.

What each RequestOutput holds follows the request's SamplingParams.output_kind: DELTA outputs carry only the
step's news (the server's streams), FINAL_ONLY requests give one output at the end (LLM.generate, the server's
non-streamed answers), CUMULATIVE ones everything at every step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from scaleinfer.engine.core_types import EngineCoreOutput
from scaleinfer.engine.detokenizer import IncrementalDetokenizer
from scaleinfer.engine.prompt_logprobs import prompt_logprob_dicts
from scaleinfer.engine.request_state import RequestState, SequenceState
from scaleinfer.errors import InvalidRequestError
from scaleinfer.outputs import RequestMetrics, RequestOutput
from scaleinfer.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ProcessedOutputs:
    request_outputs: list[RequestOutput] = field(default_factory=list)
    to_stop: list[tuple[str, int]] = field(default_factory=list)  # (request id, index): a stop string ended it
    to_abort: list[str] = field(default_factory=list)  # requests that failed here: the core must drop them
    # request id -> error_kind of the requests the core failed or refused (ERROR_INVALID, ...)
    error_kinds: dict[str, str] = field(default_factory=dict)


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self.num_unstarted = 0  # sequences of unfinished requests that have produced no token yet (queued)

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float) -> None:
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if self.tokenizer is None and params.stop:
            raise InvalidRequestError(f"stop strings {params.stop} need a tokenizer; this engine skipped it")
        delta = params.output_kind is RequestOutputKind.DELTA
        children = [SequenceState(self._detokenizer(prompt_token_ids, params), params.logprobs, delta)
                    for _ in range(params.n)]
        self.requests[request_id] = RequestState(request_id, prompt, prompt_token_ids, children,
                                                 RequestMetrics(arrival_time=arrival_time), None, params.output_kind)
        self.num_unstarted += params.n

    def _detokenizer(self, prompt_token_ids: list[int], params: SamplingParams) -> IncrementalDetokenizer | None:
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._drop(request_id)

    def _drop(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        if state is not None:
            self.num_unstarted -= sum(not child.started for child in state.children)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def process(self, outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        processed = ProcessedOutputs()
        touched: dict[str, RequestState] = {}
        now = time.time()
        for output in outputs:
            state = self.requests.get(output.request_id)
            if state is None:  # aborted, or failed earlier in this step
                continue
            if output.error is not None:
                processed.request_outputs.append(self._fail(state, output.error))
                processed.error_kinds[state.request_id] = output.error_kind
                touched.pop(state.request_id, None)
                continue
            if self._update(state, output, processed, now):
                touched[state.request_id] = state
        processed.request_outputs += [output for state in touched.values()
                                      if (output := self._emit(state, now)) is not None]
        return processed

    def _update(self, state: RequestState, output: EngineCoreOutput, processed: ProcessedOutputs,
                now: float) -> bool:
        """True when the request has something new to show."""
        child = state.children[output.index]
        if child.finished:  # a stop string ended it; the core sampled on before its abort arrived
            return False
        if not child.started and output.new_token_ids:
            child.started = True
            self.num_unstarted -= 1
        try:
            stop = child.update(output, self.tokenizer)
        except Exception as exc:  # one request's bad state must not end the others
            logger.error("request %s failed in the output processor; aborting it alone", state.request_id,
                         exc_info=exc)
            processed.request_outputs.append(self._fail(state, f"{type(exc).__name__}: {exc}"))
            processed.to_abort.append(state.request_id)
            return False
        if stop is not None and output.finish_reason is None:
            processed.to_stop.append((state.request_id, output.index))
        metrics = state.metrics
        metrics.first_token_time = metrics.first_token_time or now
        if output.index == 0 and output.num_cached_tokens:
            metrics.num_cached_tokens = output.num_cached_tokens
        if output.queue_time_s is not None and metrics.queue_time_s is None:
            metrics.queue_time_s = output.queue_time_s
        if output.prompt_logprobs is not None:
            state.prompt_logprobs = prompt_logprob_dicts(state.prompt_token_ids, output.prompt_logprobs,
                                                         self.tokenizer)
        return True

    def _fail(self, state: RequestState, error: str) -> RequestOutput:
        self._drop(state.request_id)
        output = state.output()
        output.finished, output.error = True, error
        return output

    def _emit(self, state: RequestState, now: float) -> RequestOutput | None:
        """None for a FINAL_ONLY request that has not finished."""
        if not state.finished:
            return None if state.output_kind is RequestOutputKind.FINAL_ONLY else state.output()
        state.metrics.finished_time = now  # output.metrics is state.metrics: the output carries it
        self._drop(state.request_id)
        return state.output()
