"""What the front keeps per user request: its n sequences' tokens, text, logprobs, finish and timing."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from scaleinfer.engine.core_types import EngineCoreOutput, SampledLogprobs
from scaleinfer.engine.detokenizer import IncrementalDetokenizer
from scaleinfer.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput


@dataclass(slots=True)
class SequenceState:
    detokenizer: IncrementalDetokenizer | None  # None: token ids only (skip_tokenizer_init)
    num_top_logprobs: int | None  # None: no logprobs asked for
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    text: str = ""  # streamed so far: never shrinks, so callers may send differences
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    started: bool = False  # has produced a token: no longer counted as queued

    def __post_init__(self) -> None:
        if self.num_top_logprobs is not None:
            self.logprobs, self.cumulative_logprob = [], 0.0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def update(self, output: EngineCoreOutput, tokenizer: Any) -> str | None:
        """Take one step's new tokens; returns the stop string they completed (then this sequence is finished
        with the tokens up to the one that completed it), else None."""
        last = len(output.new_token_ids) - 1
        for i, token_id in enumerate(output.new_token_ids):
            self.token_ids.append(token_id)
            if output.new_logprobs is not None:
                self._record(token_id, output.new_logprobs[i], tokenizer)
            finish_reason = output.finish_reason if i == last else None
            stop = self._advance(token_id, finish_reason)
            if stop is not None:
                self.finish_reason, self.stop_reason = "stop", stop
                return stop
        self.finish_reason, self.stop_reason = output.finish_reason, output.stop_reason
        return None

    def _advance(self, token_id: int, finish_reason: str | None) -> str | None:
        """Detokenize the newest token; returns the stop string it completed, if any."""
        if self.detokenizer is None:
            return None
        stop = self.detokenizer.update([token_id], stop_terminated=finish_reason == "stop")
        if stop is not None or finish_reason is not None:
            self.detokenizer.finish()
        self.text += self.detokenizer.delta()
        return stop

    def _record(self, token_id: int, sampled: SampledLogprobs, tokenizer: Any) -> None:
        if self.logprobs is None:
            return
        entry = {token_id: Logprob(sampled.logprob, sampled.rank, _decode(tokenizer, token_id))}
        pairs = zip(sampled.top_token_ids[:self.num_top_logprobs], sampled.top_logprobs)
        for rank, (top_id, logprob) in enumerate(pairs, 1):
            entry.setdefault(top_id, Logprob(logprob, rank, _decode(tokenizer, top_id)))
        self.logprobs.append(entry)
        self.cumulative_logprob += sampled.logprob

    def completion(self, index: int) -> CompletionOutput:
        return CompletionOutput(
            index=index, text=self.text, token_ids=list(self.token_ids), cumulative_logprob=self.cumulative_logprob,
            logprobs=self.logprobs, finish_reason=self.finish_reason, stop_reason=self.stop_reason)


@dataclass(slots=True)
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[SequenceState]
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.time()))
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # once the prompt ran, when asked for

    @property
    def finished(self) -> bool:
        return all(child.finished for child in self.children)

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[child.completion(i) for i, child in enumerate(self.children)],
            finished=self.finished,
            metrics=self.metrics,
            prompt_logprobs=self.prompt_logprobs,
        )


def _decode(tokenizer: Any, token_id: int) -> str | None:
    return None if tokenizer is None else tokenizer.decode([token_id])
