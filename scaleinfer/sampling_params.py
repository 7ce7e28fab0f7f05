"""SamplingParams: how one request is decoded; validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from scaleinfer.errors import InvalidRequestError

MAX_LOGPROBS = 20
MAX_ABS_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty
MAX_ABS_LOGIT_BIAS = 100.0  # OpenAI's range for each logit_bias value


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs per generated token (the sampled one always included)
    # OpenAI: subtracted from the logit of every token generated so far, once (presence) or per occurrence
    # (frequency). vLLM/HF repetition_penalty: the logit of every token in the prompt or the output is
    # divided by it when positive, multiplied when negative (> 1 discourages repeats).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        _check(isinstance(self.n, int) and self.n >= 1, "n must be an integer >= 1", self.n)
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
               "max_tokens must be an integer >= 1", self.max_tokens)
        _check(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
               f"min_tokens must be in [0, max_tokens={self.max_tokens}]", self.min_tokens)
        _check(_is_number(self.temperature) and self.temperature >= 0,
               "temperature must be >= 0", self.temperature)
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]", self.top_p)
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be -1, 0 or positive", self.top_k)
        _check(self.seed is None or isinstance(self.seed, int), "seed must be an integer", self.seed)
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
               f"logprobs must be in [0, {MAX_LOGPROBS}]", self.logprobs)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings", self.stop)
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids must be non-negative integers", self.stop_token_ids)
        self._check_penalties()

    def _check_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_number(value) and -MAX_ABS_PENALTY <= value <= MAX_ABS_PENALTY,
                   f"{name} must be in [-{MAX_ABS_PENALTY}, {MAX_ABS_PENALTY}]", value)
        _check(_is_number(self.repetition_penalty) and 0 < self.repetition_penalty < float("inf"),
               "repetition_penalty must be a finite number > 0", self.repetition_penalty)
        self.logit_bias = dict(self.logit_bias or {})
        _check(all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.logit_bias),
               "logit_bias must have non-negative token ids as keys", list(self.logit_bias))
        _check(all(_is_number(b) and abs(b) <= MAX_ABS_LOGIT_BIAS for b in self.logit_bias.values()),
               f"logit_bias must have values in [-{MAX_ABS_LOGIT_BIAS}, {MAX_ABS_LOGIT_BIAS}]", self.logit_bias)

    def check_token_ids(self, vocab_size: int) -> None:
        """The token ids this request names (stop_token_ids, logit_bias) must exist in the model's vocabulary."""
        bad = [t for t in [*self.stop_token_ids, *self.logit_bias] if t >= vocab_size]
        _check(not bad, f"logit_bias token ids must be < the vocab size {vocab_size} (stop_token_ids too)", bad[:5])

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, message: str, value: object) -> None:
    if not ok:
        raise InvalidRequestError(f"{message}, got {value!r}")
