"""What the front keeps per user request: its n sequences' tokens, text, logprobs, finish and timing, and how
much of them its outputs carried (RequestOutputKind: DELTA outputs carry only what is new, so a step's work
is bounded by its new tokens; CUMULATIVE and FINAL_ONLY outputs copy the whole, once per output)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from scaleinfer.engine.core_types import EngineCoreOutput, SampledLogprobs
from scaleinfer.engine.detokenizer import IncrementalDetokenizer
from scaleinfer.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from scaleinfer.sampling_params import RequestOutputKind


@dataclass(slots=True)
class SequenceState:
    detokenizer: IncrementalDetokenizer | None  # None: token ids only (skip_tokenizer_init)
    num_top_logprobs: int | None  # None: no logprobs asked for
    delta: bool = False  # outputs carry only what is new (RequestOutputKind.DELTA)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    started: bool = False  # has produced a token: no longer counted as queued
    text_parts: list[str] = field(default_factory=list)  # the text streamed so far (not kept for delta outputs)
    # delta outputs: what the previous one carried up to
    num_sent_tokens: int = 0
    unsent_text: str = ""  # released by the detokenizer since (never taken back: the text only grows)
    finish_sent: bool = False

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
        text = self.detokenizer.delta()
        if self.delta:
            self.unsent_text += text  # one output's worth at most: it is emptied by each delta output
        elif text:
            self.text_parts.append(text)
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

    @property
    def text(self) -> str:
        """The text streamed so far (joined on each call)."""
        return "".join(self.text_parts)

    def has_news(self) -> bool:
        """For delta outputs: something the previous output did not carry (tokens, or the finish)."""
        return not self.finish_sent and (len(self.token_ids) > self.num_sent_tokens or self.finished)

    def completion(self, index: int) -> CompletionOutput:
        if self.delta:
            return self._delta_completion(index)
        return CompletionOutput(
            index=index, text=self.text, token_ids=list(self.token_ids), cumulative_logprob=self.cumulative_logprob,
            logprobs=None if self.logprobs is None else list(self.logprobs), finish_reason=self.finish_reason,
            stop_reason=self.stop_reason)

    def _delta_completion(self, index: int) -> CompletionOutput:
        start, self.num_sent_tokens = self.num_sent_tokens, len(self.token_ids)
        text, self.unsent_text = self.unsent_text, ""
        self.finish_sent = self.finished
        return CompletionOutput(
            index=index, text=text, token_ids=self.token_ids[start:], cumulative_logprob=self.cumulative_logprob,
            logprobs=None if self.logprobs is None else self.logprobs[start:], finish_reason=self.finish_reason,
            stop_reason=self.stop_reason)


@dataclass(slots=True)
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[SequenceState]
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.time()))
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # once the prompt ran, when asked for
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    @property
    def finished(self) -> bool:
        return all(child.finished for child in self.children)

    def output(self) -> RequestOutput:
        """Per output_kind: a DELTA output holds the sequences with news, each with only what is new, and the
        prompt logprobs once; the others hold everything."""
        delta = self.output_kind is RequestOutputKind.DELTA
        children = [(i, child) for i, child in enumerate(self.children) if not delta or child.has_news()]
        prompt_logprobs = self.prompt_logprobs
        if delta:
            self.prompt_logprobs = None
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[child.completion(i) for i, child in children],
            finished=self.finished,
            metrics=self.metrics,
            prompt_logprobs=prompt_logprobs,
        )


def _decode(tokenizer: Any, token_id: int) -> str | None:
    return None if tokenizer is None else tokenizer.decode([token_id])
