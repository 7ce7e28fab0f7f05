"""Structured outputs on the control plane: grammars compiled with xgrammar, one matcher per sequence, and
each step's token bitmask, built on the CPU before the step runs.

A request's constraint (SamplingParams.structured_outputs) is compiled once when it is added (a bad schema,
regex or grammar is refused there), from a cache keyed by the constraint; each of its sequences gets its
own GrammarMatcher. Every step the scheduler asks, for the sequences that sample, which tokens their
grammar allows next (`grammar_bitmask`), and after the step each sampled token advances its matcher
(`SequenceGrammar.accept`), which says when the grammar is complete: the sequence then stops.

The matcher's state is that of the sequence's kept output tokens: a matcher that accepted tokens the
sequence no longer holds rolls back before its next bitmask. xgrammar is imported on the first constrained
request (it brings torch along; the engine itself never names it).
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from scaleinfer.engine.json_whitespace import WhitespacePatternError, json_grammar_with_whitespace
from scaleinfer.errors import InvalidRequestError
from scaleinfer.outputs import GrammarBitmask
from scaleinfer.sampling_params import MAX_SHOWN_CHARS, StructuredOutputsParams

if TYPE_CHECKING:
    from scaleinfer.config import ModelConfig
    from scaleinfer.engine.sequence import Sequence
    from scaleinfer.weights.source import ModelSource

logger = logging.getLogger(__name__)

MAX_CACHED_GRAMMARS = 256  # compiled grammars kept, least recently used dropped first
# xgrammar's C++ errors start "[hh:mm:ss] /path/file.cc:123: " (and "Check failed: ... is false: "):
# the user needs the rest.
_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


@dataclass(slots=True)
class SequenceGrammar:
    """One sequence's matcher. num_accepted: the output tokens it has accepted (its state's length)."""

    matcher: Any  # xgrammar.GrammarMatcher
    num_words: int  # of its bitmask row: ceil(the model's vocab size / 32)
    num_accepted: int = 0

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; True when the grammar is complete (the sequence must stop). A token
        the grammar does not allow (only a row whose mask was not applied can draw one) raises ValueError."""
        if not self.matcher.accept_token(token_id):
            raise ValueError(f"token {token_id} is not allowed by the request's grammar")
        self.num_accepted += 1
        return self.matcher.is_terminated()

    def rollback_to(self, num_output_tokens: int) -> None:
        """Make the state that of the first num_output_tokens output tokens (tokens dropped after it accepted
        them, as a preemption that discards them would)."""
        if self.num_accepted > num_output_tokens:
            self.matcher.rollback(self.num_accepted - num_output_tokens)
            self.num_accepted = num_output_tokens

    def fill(self, bitmask: np.ndarray, row: int) -> bool:
        """Write the allowed next tokens into bitmask[row]; False when it allows every token."""
        return self.matcher.fill_next_token_bitmask(bitmask, row)


class StructuredOutputs:
    """Compiles requests' constraints against the tokenizer (loaded on the first constrained request: the
    engine core holds no tokenizer otherwise) and hands out matchers.

    load_tokenizer: returns the model's tokenizer, or None when the engine skipped it. vocab_size: the
    model's; the tokens past the tokenizer's are never allowed. stop_token_ids: the engine's end-of-sequence
    ids, the only tokens a complete grammar allows."""

    def __init__(self, load_tokenizer: Callable[[], Any], vocab_size: int, stop_token_ids: SequenceOf[int]) -> None:
        self.load_tokenizer, self.vocab_size, self.stop_token_ids = load_tokenizer, vocab_size, list(stop_token_ids)
        self.num_words = -(-vocab_size // 32)
        self._compiler: Any = None
        self._cache: OrderedDict[str, Any] = OrderedDict()  # constraint key -> CompiledGrammar

    @classmethod
    def for_model(cls, config: ModelConfig, source: ModelSource, stop_token_ids: SequenceOf[int]) -> StructuredOutputs:
        def load_tokenizer() -> Any:
            from scaleinfer.tokenizer import tokenizer_for

            return None if config.skip_tokenizer_init else tokenizer_for(source, config)

        return cls(load_tokenizer, source.arch.vocab_size, stop_token_ids)

    def compile(self, params: StructuredOutputsParams | None) -> Any:
        """The compiled grammar of a request's constraint (None without one); InvalidRequestError naming the
        value when it does not compile."""
        if params is None:
            return None
        key = _cache_key(params)
        compiled = self._cache.get(key)
        if compiled is None:
            compiled = self._cache[key] = self._compile(params)
            if len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return compiled

    def grammar(self, compiled: Any) -> SequenceGrammar | None:
        """A fresh matcher for one sequence of a request compiled to `compiled` (None: unconstrained)."""
        if compiled is None:
            return None
        import xgrammar

        return SequenceGrammar(xgrammar.GrammarMatcher(compiled), self.num_words)

    def _compile(self, params: StructuredOutputsParams) -> Any:
        kind = params.kind
        value = getattr(params, kind)
        try:
            return _COMPILERS[kind](self._get_compiler(), params)
        except WhitespacePatternError as exc:
            raise InvalidRequestError(f"structured_outputs.whitespace_pattern {params.whitespace_pattern[:200]!r} "
                                      f"cannot be honoured ({_message(exc)})") from exc
        except (RuntimeError, ValueError, TypeError) as exc:
            where = params.origin or f"structured_outputs.{kind}"
            raise InvalidRequestError(f"{where} does not compile ({_message(exc)}): {_shown(value)}") from exc

    def _get_compiler(self) -> Any:
        if self._compiler is None:
            tokenizer = self.load_tokenizer()
            if tokenizer is None:
                raise InvalidRequestError("structured outputs need the tokenizer; this engine skipped it")
            import xgrammar

            info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                           stop_token_ids=self.stop_token_ids)
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        return self._compiler


def grammar_bitmask(seqs: list[Sequence]) -> GrammarBitmask | None:
    """The bitmask of the constrained sequences about to sample (seq.grammar set), each matcher first rolled
    back to the tokens its sequence keeps; None when none of them restricts its next token."""
    if not seqs:
        return None
    num_words = seqs[0].grammar.num_words
    bitmask = np.full((len(seqs), num_words), -1, dtype=np.int32)  # all bits set: every token allowed
    request_ids = []
    for seq in seqs:
        seq.grammar.rollback_to(seq.num_output_tokens)
        if seq.grammar.fill(bitmask, len(request_ids)):
            request_ids.append(seq.request_id)
    if not request_ids:
        return None
    return GrammarBitmask(request_ids=request_ids, num_words=num_words,
                          data=bitmask[:len(request_ids)].astype("<i4", copy=False).tobytes())


def _compile_json(compiler: Any, params: StructuredOutputsParams) -> Any:
    schema = params.json if isinstance(params.json, str) else json.dumps(params.json)
    if params.whitespace_pattern is not None:
        return compiler.compile_grammar(json_grammar_with_whitespace(schema, params.whitespace_pattern))
    return compiler.compile_json_schema(schema, any_whitespace=not params.disable_any_whitespace)


def _compile_json_object(compiler: Any, params: StructuredOutputsParams) -> Any:
    # An object, not any JSON value: what OpenAI's response_format {"type": "json_object"} promises.
    schema = '{"type": "object"}'
    if params.whitespace_pattern is not None:
        return compiler.compile_grammar(json_grammar_with_whitespace(schema, params.whitespace_pattern, False))
    return compiler.compile_json_schema(schema, any_whitespace=not params.disable_any_whitespace, strict_mode=False)


def _compile_choice(compiler: Any, params: StructuredOutputsParams) -> Any:
    alternatives = " | ".join(json.dumps(choice) for choice in params.choice)  # EBNF strings: JSON's escapes
    return compiler.compile_grammar(f"root ::= {alternatives}")


_COMPILERS = {
    "json": _compile_json,
    "json_object": _compile_json_object,
    "regex": lambda compiler, params: compiler.compile_regex(params.regex),
    "choice": _compile_choice,
    "grammar": lambda compiler, params: compiler.compile_grammar(params.grammar),
}


def _cache_key(params: StructuredOutputsParams) -> str:
    """The same schema as a dict or as JSON text, keys in any order, is one key."""
    value = getattr(params, params.kind)
    if params.kind == "json" and isinstance(value, str):
        value = json.loads(value)  # SamplingParams checked that it parses
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return f"{params.kind}:{params.disable_any_whitespace}:{params.whitespace_pattern!r}:{text}"


def _message(exc: Exception) -> str:
    lines = [_LOCATION.sub("", line).strip() for line in str(exc).strip().splitlines()]
    return " ".join(line for line in lines if line) or type(exc).__name__


def _shown(value: object) -> str:
    shown = value if isinstance(value, str) else json.dumps(value)
    return shown if len(shown) <= MAX_SHOWN_CHARS else shown[:MAX_SHOWN_CHARS] + "..."
