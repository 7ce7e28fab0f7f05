"""SamplingParams: how one request is decoded; validated on construction.

Every float field must be finite (NaN and +-inf are refused) and every bound below is chosen so that no
accepted value can make a logit NaN or infinite in float32.
"""

from __future__ import annotations

import enum
import json as json_module
import math
from dataclasses import dataclass, field
from typing import Any

from scaleinfer.errors import InvalidRequestError

MAX_LOGPROBS = 20
MAX_ABS_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty
MAX_ABS_LOGIT_BIAS = 100.0  # OpenAI's range for each logit_bias value
# Below this a temperature is greedy (vLLM's epsilon): dividing logits by it would overflow float32.
MIN_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 100.0  # 50x OpenAI's 2; past it sampling is uniform anyway, and it stays finite in float32
# logits / 0.01 and logits * 100 stay finite for any logit a model produces (|logit| < 3e36).
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
# OpenAI allows 4 stop strings; every generated token is checked against each, so they are bounded.
MAX_STOP_STRINGS, MAX_STOP_STRING_CHARS = 16, 512
MAX_STOP_TOKEN_IDS = 256  # the scheduler checks every sampled token against them
# What torch.Generator.manual_seed accepts: any int64 or uint64; it takes the seed modulo 2**64.
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1
MAX_SHOWN_CHARS = 200  # of a bad value, in its error message
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(slots=True)
class StructuredOutputsParams:
    """What the output must match (vLLM's StructuredOutputsParams), exactly one of: `json`, a JSON schema (a
    dict, or its JSON text); `json_object`, any JSON object; `regex`; `choice`, one of these strings;
    `grammar`, an EBNF/GBNF grammar as xgrammar takes it (rule `root` first). Plain data: it crosses a
    msgspec channel as it is. Compiled by the engine when the request is added, where a bad schema, regex
    or grammar is refused."""

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    # JSON only: no whitespace but json.dumps' (one space after "," and ":"); small models otherwise tend to
    # spend their tokens on newlines. By default any whitespace is allowed, as vLLM's xgrammar backend does.
    disable_any_whitespace: bool = False
    # JSON only (json, json_object): a regex every run of whitespace between JSON tokens must match (vLLM's),
    # e.g. "[ ]?"; "" allows none. None: any whitespace (or disable_any_whitespace's).
    whitespace_pattern: str | None = None
    # The request field that set it, as its errors name it ("response_format.json_schema.schema", "guided_regex");
    # None: the constraint itself (structured_outputs.<kind>).
    origin: str | None = None

    def __post_init__(self) -> None:
        _check(self.json is None or isinstance(self.json, (dict, str)), "structured_outputs.json must be a JSON "
               "schema: an object or its JSON text", self.json)
        if isinstance(self.json, str):
            _check(_parses_as_object(self.json), "structured_outputs.json must be a JSON schema object", self.json)
        _check(isinstance(self.json_object, bool), "structured_outputs.json_object must be a bool", self.json_object)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, str) and value), f"structured_outputs.{name} must be a "
                   "non-empty string", value)
        if self.choice is not None:
            self.choice = list(self.choice) if isinstance(self.choice, (list, tuple)) else self.choice
            _check(isinstance(self.choice, list) and self.choice and all(isinstance(c, str) and c
                   for c in self.choice), "structured_outputs.choice must be a non-empty list of non-empty "
                   "strings", self.choice)
        kinds = self.kinds
        _check(len(kinds) == 1, f"structured_outputs must set exactly one of {', '.join(STRUCTURED_KINDS)}", kinds)
        self._check_whitespace_pattern()

    def _check_whitespace_pattern(self) -> None:
        pattern = self.whitespace_pattern
        if pattern is None:
            return
        _check(isinstance(pattern, str), "structured_outputs.whitespace_pattern must be a string (a regex)", pattern)
        _check(self.kind in ("json", "json_object"), "structured_outputs.whitespace_pattern applies to JSON "
               "outputs (json, json_object) only", self.kind)
        _check(not self.disable_any_whitespace, "structured_outputs.whitespace_pattern cannot be combined with "
               "disable_any_whitespace (the pattern says which whitespace is allowed)", pattern)

    @property
    def kinds(self) -> list[str]:
        """The constraint fields that are set (one, once constructed)."""
        return [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]

    @property
    def kind(self) -> str:
        return self.kinds[0]


class RequestOutputKind(enum.IntEnum):
    """What a request's RequestOutputs hold (vLLM's). CUMULATIVE: all of it so far, at every step. DELTA: only
    what is new since the previous output (texts, token ids and logprobs concatenate; a finished sequence comes
    once more with its finish reason, then no more). FINAL_ONLY: one output, when the request finishes."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    # [0, MAX_TEMPERATURE]; 0 is greedy, and so is anything below MIN_TEMPERATURE (set to 0 on construction).
    temperature: float = 1.0
    top_p: float = 1.0
    # In [0, 1]; 0 is off. Tokens whose probability (after temperature) is below min_p times the most likely
    # token's are dropped (vLLM's min_p).
    min_p: float = 0.0
    # 0 or -1: off. A top_k at or above the vocabulary keeps every token (the sampler clamps it, as vLLM).
    top_k: int = 0
    # In [MIN_SEED, MAX_SEED]. With n > 1, sequence i of the request draws from (seed + i) mod 2**64.
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # at most MAX_STOP_STRINGS of at most MAX_STOP_STRING_CHARS
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs per generated token (the sampled one always included)
    # Top-k logprobs per prompt position (each prompt token's own always included; None for the first).
    # Such a request's prompt is always computed: it takes no prefix-cache hits (as vLLM).
    prompt_logprobs: int | None = None
    # OpenAI: subtracted from the logit of every token generated so far, once (presence) or per occurrence
    # (frequency). vLLM/HF repetition_penalty: the logit of every token in the prompt or the output is
    # divided by it when positive, multiplied when negative (> 1 discourages repeats).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # in [MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY]
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None  # the output must match it (JSON, regex, ...)
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE  # the front's only: the core never reads it

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
        self._check_sampling()
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
               f"logprobs must be in [0, {MAX_LOGPROBS}]", self.logprobs)
        _check(self.prompt_logprobs is None or (_is_int(self.prompt_logprobs)
                                                and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
               f"prompt_logprobs must be in [0, {MAX_LOGPROBS}]", self.prompt_logprobs)
        self._check_stop()
        self._check_penalties()
        self._check_structured()
        _check(self.output_kind in list(RequestOutputKind), "output_kind must be a RequestOutputKind",
               self.output_kind)
        self.output_kind = RequestOutputKind(self.output_kind)

    def _check_sampling(self) -> None:
        _check(_is_finite(self.temperature), "temperature must be a finite number", self.temperature)
        _check(self.temperature >= 0, "temperature must be >= 0", self.temperature)
        _check(self.temperature <= MAX_TEMPERATURE, f"temperature must be <= {MAX_TEMPERATURE}", self.temperature)
        if self.temperature < MIN_TEMPERATURE:
            self.temperature = 0.0
        _check(_is_finite(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]", self.top_p)
        _check(_is_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p must be in [0, 1]", self.min_p)
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k must be -1, 0 or positive", self.top_k)
        _check(self.seed is None or (_is_int(self.seed) and MIN_SEED <= self.seed <= MAX_SEED),
               "seed must be an integer in [-2**63, 2**64 - 1]", self.seed)

    def _check_stop(self) -> None:
        _check(len(self.stop) <= MAX_STOP_STRINGS, f"stop must have at most {MAX_STOP_STRINGS} strings",
               len(self.stop))
        _check(all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings", self.stop)
        longest = max((len(s) for s in self.stop), default=0)
        if longest > MAX_STOP_STRING_CHARS:
            raise InvalidRequestError(f"stop must be strings of at most {MAX_STOP_STRING_CHARS} characters, "
                                      f"got one of {longest}")
        _check(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
               f"stop_token_ids must have at most {MAX_STOP_TOKEN_IDS} ids", len(self.stop_token_ids))
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids must be non-negative integers", self.stop_token_ids)

    def _check_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_finite(value) and -MAX_ABS_PENALTY <= value <= MAX_ABS_PENALTY,
                   f"{name} must be in [-{MAX_ABS_PENALTY}, {MAX_ABS_PENALTY}]", value)
        _check(_is_finite(self.repetition_penalty)
               and MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
               f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}]",
               self.repetition_penalty)
        self.logit_bias = dict(self.logit_bias or {})
        _check(all(_is_int(t) and t >= 0 for t in self.logit_bias),
               "logit_bias must have non-negative token ids as keys", list(self.logit_bias))
        _check(all(_is_finite(b) and abs(b) <= MAX_ABS_LOGIT_BIAS for b in self.logit_bias.values()),
               f"logit_bias must have values in [-{MAX_ABS_LOGIT_BIAS}, {MAX_ABS_LOGIT_BIAS}]", self.logit_bias)

    def _check_structured(self) -> None:
        value = self.structured_outputs
        if isinstance(value, dict):  # as a server or a msgspec channel without the type may hand it over
            value = self.structured_outputs = StructuredOutputsParams(**value)
        _check(value is None or isinstance(value, StructuredOutputsParams),
               "structured_outputs must be a StructuredOutputsParams", value)
        # Where a grammar ends it allows only the end of sequence, which min_tokens would ban: nothing is left.
        _check(value is None or self.min_tokens == 0, "min_tokens cannot be combined with structured_outputs "
               "(the grammar decides where the output ends)", self.min_tokens)

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


def child_seed(seed: int, index: int) -> int:
    """The seed of sequence `index` of an n > 1 request: seed + index, wrapped into [0, 2**64) when it passes
    MAX_SEED (torch takes every seed modulo 2**64, so wrapping changes no stream)."""
    seed += index
    return seed if seed <= MAX_SEED else seed % 2**64


def _parses_as_object(text: str) -> bool:
    try:
        return isinstance(json_module.loads(text), dict)
    except ValueError:
        return False


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: object) -> bool:
    """A real number that is not NaN or +-inf (an int too large for a float is not finite either)."""
    try:
        return _is_number(value) and math.isfinite(value)
    except OverflowError:
        return False


def _check(ok: bool, message: str, value: object) -> None:
    if not ok:
        shown = repr(value)  # a hostile value may be megabytes long: the message keeps its start
        shown = shown if len(shown) <= MAX_SHOWN_CHARS else shown[:MAX_SHOWN_CHARS] + "..."
        raise InvalidRequestError(f"{message}, got {shown}")
