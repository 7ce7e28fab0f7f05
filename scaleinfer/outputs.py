"""What the engine returns to users, and the two boundary types between control and data plane.

SchedulerOutput (engine -> worker) says which sequences run this step and which tokens each computes;
RunnerOutput (worker -> engine) carries what was sampled. Neither holds a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scaleinfer.sampling_params import SamplingParams


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int  # 1 = most likely
    decoded_token: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None  # one dict per generated token
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or string that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, later: CompletionOutput) -> None:
        """Append the next delta of this sequence (RequestOutputKind.DELTA): this then spans both."""
        self.text += later.text
        self.token_ids += later.token_ids
        if later.logprobs is not None:  # each delta's lists are its own (slices): extended in place
            self.logprobs = self.logprobs or []
            self.logprobs += later.logprobs
        self.cumulative_logprob = later.cumulative_logprob  # a running total already
        self.finish_reason, self.stop_reason = later.finish_reason, later.stop_reason


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    queue_time_s: float | None = None  # arrival to first scheduled, by the core's clock


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    error: str | None = None  # set when this request failed alone inside the engine (finished, aborted)
    # With SamplingParams.prompt_logprobs, once the prompt ran: one entry per prompt position, None for the
    # first, else token id -> Logprob with the prompt token included (vLLM's shape).
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    def add(self, later: RequestOutput) -> None:
        """Append the next delta of this request (RequestOutputKind.DELTA), as a slow reader's stream coalesces
        them: each sequence's text, token ids and logprobs concatenate; the later finish and error win."""
        mine = {output.index: output for output in self.outputs}
        for output in later.outputs:
            if output.index in mine:
                mine[output.index].add(output)
            else:
                self.outputs.append(output)
        self.outputs.sort(key=lambda output: output.index)
        self.finished, self.error, self.metrics = later.finished, later.error or self.error, later.metrics
        self.prompt_logprobs = self.prompt_logprobs or later.prompt_logprobs


@dataclass(slots=True)
class EmbeddingOutput:
    embedding: list[float]  # L2-normalized, [hidden_size]


@dataclass(slots=True)
class EmbeddingRequestOutput:
    """What LLM.embed returns per prompt, as vLLM's: the vector is .outputs.embedding."""

    request_id: str
    prompt: str | None  # None when the prompt came as token ids
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True


# ---- control plane -> data plane ------------------------------------------------------------------


@dataclass(slots=True)
class ScheduledSequence:
    """One sequence's share of a step: compute `token_ids` at positions start_pos.. and maybe sample."""

    request_id: str
    token_ids: list[int]  # the chunk to compute this step (a whole prompt, a prefill chunk, or 1 token)
    start_pos: int  # == num_computed_tokens before this step
    block_table: list[int]  # covers at least start_pos + len(token_ids) slots
    sample: bool  # True when this chunk reaches the sequence's last token
    sampling_params: SamplingParams
    num_output_tokens: int = 0  # generated so far (min_tokens masking)
    eos_token_ids: tuple[int, ...] = ()  # masked while num_output_tokens < min_tokens
    prompt_token_ids: list[int] = field(default_factory=list)  # the whole prompt, shared (repetition penalty)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.start_pos + len(self.token_ids)

    @property
    def is_prefill(self) -> bool:
        return self.start_pos == 0 or len(self.token_ids) > 1


@dataclass(slots=True)
class GrammarBitmask:
    """The tokens a grammar allows next, for the sampled sequences of a step that have one (structured outputs).

    data: [len(request_ids), num_words] int32, little-endian, row-major: bit j of word w set <=> token 32 * w + j
    is allowed (xgrammar's layout). Bytes, so it crosses to other ranks as it is; tokens past 32 * num_words
    (a vocabulary padded past the tokenizer's) are never allowed."""

    request_ids: list[str]
    num_words: int
    data: bytes


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSequence]
    finished_request_ids: list[str] = field(default_factory=list)  # runner drops their state
    num_preempted: int = 0
    grammar_bitmask: GrammarBitmask | None = None  # None when no sampled sequence is constrained
    # KV blocks to move between the device and host memory (kv_offload) before this step's forward, as (device block
    # id, host block index) pairs: swap_out first, in order, then swap_in (engine/block_manager.py says why that
    # order is safe). Every worker moves its own share (its KV heads, its stage's layers) of the same blocks.
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    # The engine expects the next step to be these decodes one token further (nothing waits to join): the
    # runner may compute it before this one's tokens reach the host (worker/step_ahead.py). One process only.
    step_ahead: bool = False

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        """Nothing for a worker to do: no sequence and no block to move."""
        return not self.scheduled and not self.swap_out and not self.swap_in


# ---- data plane -> control plane ------------------------------------------------------------------


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float | None = None  # of token_id, when logprobs were asked for
    rank: int | None = None
    top_token_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass(slots=True)
class PromptLogprobsChunk:
    """Logprobs of the prompt tokens at first_pos, first_pos + 1, ... that one prefill chunk scored, each under
    the logits of the position before it (SamplingParams.prompt_logprobs)."""

    first_pos: int
    logprobs: list[float]  # of each prompt token
    ranks: list[int]  # its rank (1 = most likely)
    top_token_ids: list[list[int]]  # prompt_logprobs alternatives per position, best first
    top_logprobs: list[list[float]]


@dataclass(slots=True)
class RunnerOutput:
    """One SampledToken per ScheduledSequence with sample=True, keyed by request id, except the failed ones."""

    sampled: dict[str, SampledToken]
    # Sequences whose sampling state could not be built (request id -> why): no token; they fail alone.
    failed: dict[str, str] = field(default_factory=dict)
    # Request id -> what its prompt chunk of this step scored, for sequences that ask for prompt logprobs.
    prompt_logprobs: dict[str, PromptLogprobsChunk] = field(default_factory=dict)
