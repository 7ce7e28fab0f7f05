"""Incremental detokenization of one request's output: streamed text deltas and stop strings.

Usage, once per engine step of a request:

    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, sampling_params)
    stop = detok.update(new_token_ids)   # the stop string that ended the text, else None
    if stop is not None or <finished by length / EOS / stop token>:
        detok.finish()                   # flush everything held back
    stream(detok.delta())                # text not streamed before; "" while nothing is certain

`output_text` is the whole output text so far (cut at a stop string); `delta()` is what can be shown
without ever being taken back. Three things make that non-trivial:

1. Tokens are not characters. A byte-level BPE token may hold part of a UTF-8 character (an emoji is
   often three tokens), and a SentencePiece token's leading space depends on the token before it. So each
   update decodes a short window twice (vLLM's prefix/read offsets): ids[prefix_offset:read_offset] is
   text already taken, ids[prefix_offset:] is that plus the new text, and the difference is the new
   text, unless it ends in U+FFFD: then a character is incomplete and the tokens wait for the next ones.
   finish() takes them as they are. The window starts with a few prompt tokens so that the first output
   token decodes as it does in context.
2. Stop strings can span tokens. Each update searches every position where a stop string could now
   end; the occurrence that ends first wins (the longest on a tie). The text is cut before it, or after it
   with include_stop_str_in_output, and the detokenizer is finished: later updates are ignored.
3. A streamed character cannot be taken back. delta() holds back the longest tail of the text that is
   the start of some stop string, and releases it once it cannot be any more, or at finish().

With skip_special_tokens, special tokens decode to "". A request that ends on an EOS or stop token id
should pass that token with `stop_terminated=True`: its text is kept only with include_stop_str_in_output.

Per update the work is bounded by the new text and the stop strings, never by the output so far: the working
text is a window (what delta() has not returned, and the last len(longest stop) - 1 characters it has, which a
stop string may still begin in); text before it is set aside in pieces, joined only for output_text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from scaleinfer.sampling_params import SamplingParams

INCOMPLETE_CHAR = "\ufffd"  # what decoding yields for a UTF-8 sequence cut short
NUM_PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded before the first output token, for its spacing


class Tokenizer(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns one request's output token ids into text, incrementally (see the module docstring)."""

    __slots__ = ("_tokenizer", "_skip_special_tokens", "_stop", "_include_stop", "_ids", "_prefix_offset",
                 "_read_offset", "_text", "_set_aside", "_num_kept", "_num_streamed", "stop_str", "finished")

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = params.skip_special_tokens
        self._stop = tuple(params.stop)
        self._include_stop = params.include_stop_str_in_output
        # window of ids still needed for decoding: ids[:read_offset] are already text
        self._ids = list(prompt_token_ids[max(0, len(prompt_token_ids) - NUM_PROMPT_CONTEXT_TOKENS):])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._text = ""  # the output text's tail from the first character not set aside
        self._set_aside: list[str] = []  # the output text before self._text, in pieces
        # streamed characters kept in the window: a stop string found later may begin in them
        self._num_kept = max((len(stop) for stop in self._stop), default=1) - 1
        self._num_streamed = 0  # of self._text: the prefix delta() has returned
        self.stop_str: str | None = None  # the stop string that cut the text
        self.finished = False

    @property
    def output_text(self) -> str:
        """The whole output text so far, held-back tail included (joined on each call)."""
        return "".join(self._set_aside) + self._text

    @property
    def num_window_chars(self) -> int:
        """Length of the working text an update touches: bounded, whatever the output's length."""
        return len(self._text)

    def update(self, new_token_ids: Sequence[int], stop_terminated: bool = False) -> str | None:
        """Add the step's new tokens; returns the stop string if one completed now, else None."""
        if self.finished:
            return None
        ids = list(new_token_ids)
        if stop_terminated and not self._include_stop:
            ids = ids[:-1]
        self._ids.extend(ids)
        return self._append(self._decode_new(final=False))

    def finish(self) -> None:
        """No more tokens will come: take incomplete characters as they are, release held-back text."""
        if not self.finished:
            self._append(self._decode_new(final=True))
            self.finished = True

    def delta(self) -> str:
        """Text not returned by an earlier delta() that no later token or stop string can change."""
        end = len(self._text) if self.finished else len(self._text) - self._num_held()
        delta = self._text[self._num_streamed:end]
        self._num_streamed = max(self._num_streamed, end)
        self._set_aside_streamed()
        return delta

    def _set_aside_streamed(self) -> None:
        num_done = min(self._num_streamed, len(self._text) - self._num_kept)
        if num_done > 0:
            self._set_aside.append(self._text[:num_done])
            self._text, self._num_streamed = self._text[num_done:], self._num_streamed - num_done

    def _decode_new(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        if len(full_text) <= len(prefix_text) or (full_text.endswith(INCOMPLETE_CHAR) and not final):
            return ""
        # the new text becomes the next window's prefix; ids before it are no longer needed
        del self._ids[:self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return full_text[len(prefix_text):]

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _append(self, new_text: str) -> str | None:
        num_checked = len(self._text)
        self._text += new_text
        hit = _first_stop(self._text, self._stop, num_checked)
        if hit is None:
            return None
        start, stop = hit
        self._text = self._text[:start + len(stop) if self._include_stop else start]
        self.stop_str, self.finished = stop, True
        return stop

    def _num_held(self) -> int:
        # With include_stop_str_in_output the tail is output whether or not it grows into a stop string.
        if self._include_stop:
            return 0
        return max((_stop_prefix_len(self._text, stop) for stop in self._stop), default=0)


def _first_stop(text: str, stops: Sequence[str], num_checked: int) -> tuple[int, str] | None:
    """(start, stop) of the stop string occurrence that ends first among those ending past num_checked."""
    best: tuple[int, int, str] | None = None  # (end, start, stop): the earliest end, then the longest
    for stop in stops:
        start = text.find(stop, max(0, num_checked - len(stop) + 1))
        if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
            best = (start + len(stop), start, stop)
    return None if best is None else (best[1], best[2])


def _stop_prefix_len(text: str, stop: str) -> int:
    """Length of the longest proper prefix of `stop` that `text` ends with."""
    for length in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:length]):
            return length
    return 0
