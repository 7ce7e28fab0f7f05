"""A scanner over tool-call JSON that may still be growing: where each call object's name and arguments are.

Streaming needs to know, from a prefix of the model's text, whether a call's name is complete and where its
arguments value starts, without waiting for the whole call. Arguments are passed on as the model wrote them
(a raw slice of its text, checked to parse once complete): a prefix of the text is then always a prefix of
the final arguments, so streamed fragments are never taken back and join to the non-streamed string.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

NAME_KEY = "name"
ARGUMENT_KEYS = ("arguments", "parameters")  # Hermes and Mistral write "arguments", Llama 3.1 "parameters"
WHITESPACE = " \t\r\n"
_VALUE_ENDS = ",}] \t\r\n"


@dataclass(slots=True)
class PartialCall:
    """One call object as far as the text goes. Offsets index the scanned text."""

    name: str | None = None  # once its string is complete
    args_start: int | None = None  # where the arguments value starts
    args_end: int | None = None  # one past its end, once complete
    end: int | None = None  # one past the object's closing brace, once complete

    @property
    def complete(self) -> bool:
        return self.end is not None

    def arguments(self, text: str) -> str:
        """The arguments text so far ("{}" for a complete call that has none)."""
        if self.args_start is None:
            return "{}" if self.complete else ""
        return text[self.args_start:self.args_end if self.args_end is not None else len(text)]


def scan_calls(text: str, start: int = 0) -> list[PartialCall]:
    """Every call object from `start` on: each begins at the next '{' (whatever separates them: tags,
    commas, brackets, semicolons); the last may be incomplete."""
    calls: list[PartialCall] = []
    i = text.find("{", start)
    while i != -1:
        call = scan_object(text, i)
        calls.append(call)
        if call.end is None:
            break
        i = text.find("{", call.end)
    return calls


def scan_object(text: str, i: int) -> PartialCall:
    """The call object whose '{' is at text[i]."""
    call = PartialCall()
    i = skip_whitespace(text, i + 1)
    while i < len(text):
        if text[i] == "}":
            call.end = i + 1
            return call
        i = _scan_member(text, i, call)
        if i is None:
            return call
        i = skip_whitespace(text, i)
        if i < len(text) and text[i] == ",":
            i = skip_whitespace(text, i + 1)
    return call


def _scan_member(text: str, i: int, call: PartialCall) -> int | None:
    """Read `"key": value` at text[i]; records name and arguments into call. None: the text ends first, or
    it is not a member (then the object never completes)."""
    key_end = value_end(text, i) if text[i] == '"' else None
    if key_end is None:
        return None
    colon = skip_whitespace(text, key_end)
    if colon >= len(text) or text[colon] != ":":
        return None
    start = skip_whitespace(text, colon + 1)
    end = value_end(text, start)
    key = loads_or_none(text[i:key_end])
    if key in ARGUMENT_KEYS and start < len(text) and call.args_start is None:
        call.args_start, call.args_end = start, end
    elif key == NAME_KEY and end is not None:
        name = loads_or_none(text[start:end])
        call.name = name if isinstance(name, str) else None
    return end


def value_end(text: str, i: int) -> int | None:
    """One past the end of the JSON value starting at text[i]; None when the text ends first."""
    if i >= len(text):
        return None
    if text[i] == '"':
        return _string_end(text, i)
    if text[i] in "{[":
        return _container_end(text, i)
    j = i
    while j < len(text) and text[j] not in _VALUE_ENDS:
        j += 1
    return j if j < len(text) else None  # a number at the very end may still grow


def _string_end(text: str, i: int) -> int | None:
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
            continue
        if text[j] == '"':
            return j + 1
        j += 1
    return None


def _container_end(text: str, i: int) -> int | None:
    depth, j = 0, i
    while j < len(text):
        char = text[j]
        if char == '"':
            end = _string_end(text, j)
            if end is None:
                return None
            j = end
            continue
        depth += 1 if char in "{[" else -1 if char in "}]" else 0
        if depth == 0:
            return j + 1
        j += 1
    return None


def skip_whitespace(text: str, i: int) -> int:
    while i < len(text) and text[i] in WHITESPACE:
        i += 1
    return i


def loads_or_none(text: str) -> object:
    """The JSON value of text, None where it is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return None
