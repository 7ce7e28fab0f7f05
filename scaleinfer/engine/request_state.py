"""What the engine keeps per user request: its n sequences' text, logprobs and timing."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from scaleinfer.engine.detokenizer import IncrementalDetokenizer
from scaleinfer.engine.sequence import Sequence, SequenceStatus
from scaleinfer.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, SampledToken


@dataclass(slots=True)
class SequenceState:
    seq: Sequence
    detokenizer: IncrementalDetokenizer | None  # None: token ids only (skip_tokenizer_init)
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float | None
    text: str = ""  # streamed so far: never shrinks, so callers may send differences

    def advance(self, token_id: int) -> str | None:
        """Detokenize the newest token; returns the stop string it completed, if any."""
        seq = self.seq
        if self.detokenizer is None:
            return None
        stop_terminated = seq.status is SequenceStatus.FINISHED_STOPPED
        stop = self.detokenizer.update([token_id], stop_terminated=stop_terminated)
        if stop is not None or seq.is_finished:
            self.detokenizer.finish()
        self.text += self.detokenizer.delta()
        return stop

    def record(self, sampled: SampledToken, tokenizer: Any) -> None:
        if self.logprobs is None or sampled.logprob is None:
            return
        entry = {sampled.token_id: Logprob(sampled.logprob, sampled.rank, _decode(tokenizer, sampled.token_id))}
        top = self.seq.sampling_params.logprobs or 0
        for rank, (token_id, logprob) in enumerate(zip(sampled.top_token_ids[:top], sampled.top_logprobs), 1):
            entry.setdefault(token_id, Logprob(logprob, rank, _decode(tokenizer, token_id)))
        self.logprobs.append(entry)
        self.cumulative_logprob += sampled.logprob

    def completion(self, index: int) -> CompletionOutput:
        seq = self.seq
        return CompletionOutput(
            index=index,
            text=self.text,
            token_ids=list(seq.output_token_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=self.logprobs,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )


@dataclass(slots=True)
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[SequenceState]
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.time()))

    @property
    def finished(self) -> bool:
        return all(child.seq.is_finished for child in self.children)

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[child.completion(i) for i, child in enumerate(self.children)],
            finished=self.finished,
            metrics=self.metrics,
        )


def _decode(tokenizer: Any, token_id: int) -> str | None:
    return None if tokenizer is None else tokenizer.decode([token_id])
