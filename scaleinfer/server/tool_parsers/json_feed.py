"""json_scan.py's reading of call objects, over text that arrives a piece at a time (streaming).

A CallScanner is fed each new piece of the calls' text once and keeps where it is in the JSON between
pieces (a small state: which part of a call object it is in, the depth and string state of a value), so a
piece costs O(its length) however long the text before it. It reads what scan_calls reads: each call
object from the next '{' on, its name once that string is complete, its arguments value passed on raw as
it arrives (fragments that join to the text extract() gives), and after an object that is not a call
object (a member without a key) nothing more.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from scaleinfer.server.tool_parsers.json_scan import ARGUMENT_KEYS, NAME_KEY, WHITESPACE, loads_or_none

_STRING_STOP = re.compile(r'["\\]')  # in a string: its end, or an escape
_CONTAINER_STOP = re.compile(r'["{}\[\]]')  # in a container, outside strings
_SCALAR_STOP = re.compile(r'[,}\] \t\r\n]')  # json_scan's _VALUE_ENDS

# A state reads text from i on; returns where it stopped (i itself when it only passed to another state).
_State = Callable[[str, int], int]


@dataclass(slots=True)
class ScannedCall:
    """One call object as far as its text has come."""

    name: str | None = None  # once its string is complete
    arguments: list[str] = field(default_factory=list)  # fragments of the arguments text not yet taken
    has_arguments: bool = False  # an arguments member began
    complete: bool = False  # its closing brace came

    def take_arguments(self) -> str:
        fragment = "".join(self.arguments)
        self.arguments.clear()
        return fragment


@dataclass(slots=True)
class ValueScan:
    """Where one JSON value (starting at its first character) ends, as json_scan.value_end finds it."""

    scalar: bool  # a number, true, false, null (or anything else): ends before a _SCALAR_STOP character
    depth: int = 0  # brackets open
    in_string: bool = False
    escaped: bool = False  # a backslash ended the last piece: the next character is skipped

    def feed(self, text: str, i: int) -> tuple[int, bool]:
        """Read text from i on: (where the value ends, True), or (len(text), False) when it goes on."""
        while i < len(text):
            if self.escaped:
                self.escaped, i = False, i + 1
            elif self.in_string:
                i = self._string(text, i)
                if not self.in_string and self.depth == 0:
                    return i, True
            elif self.scalar:
                found = _SCALAR_STOP.search(text, i)
                return (len(text), False) if found is None else (found.start(), True)
            else:
                i = self._container(text, i)
                if self.depth == 0 and not self.in_string:
                    return i, True
        return len(text), False

    def _string(self, text: str, i: int) -> int:
        found = _STRING_STOP.search(text, i)
        if found is None:
            return len(text)
        self.escaped = found.group() == "\\"
        self.in_string = self.escaped
        return found.end()

    def _container(self, text: str, i: int) -> int:
        found = _CONTAINER_STOP.search(text, i)
        if found is None:
            return len(text)
        char = found.group()
        if char == '"':
            self.in_string = True
        else:
            self.depth += 1 if char in "{[" else -1
        return found.end()


class CallScanner:
    """The call objects of a format's call text, each from the next '{' (what separates them is skipped)."""

    def __init__(self) -> None:
        self.examined = 0  # characters the states have read, for tests: O(text fed), not O(text squared)
        self._state: _State = self._seek
        self._after_call: _State = self._seek
        self._call: ScannedCall | None = None
        self._touched: list[ScannedCall] = []
        self._key: object = None  # the member's key, decoded
        self._value = ValueScan(scalar=True)
        self._sink: list[str] | None = None  # where the value's text goes (None: skipped)
        self._on_value_end: Callable[[], None] = self._member_done

    def feed(self, text: str) -> list[ScannedCall]:
        """Read the next piece: the calls it added to or completed, in order (an open one last)."""
        self._touched = [] if self._call is None else [self._call]
        i = 0
        while i < len(text):
            j = self._state(text, i)
            self.examined += max(j - i, 1)
            i = j
        return self._touched

    # ---- the states, between and in call objects --------------------------------------------------

    def _seek(self, text: str, i: int) -> int:
        brace = text.find("{", i)
        if brace == -1:
            return len(text)
        self._call = ScannedCall()
        self._touched.append(self._call)
        self._state = self._key_or_end
        return brace + 1

    def _key_or_end(self, text: str, i: int) -> int:
        char = text[i]
        if char in WHITESPACE:
            return i + 1
        if char == "}":
            self._end_call()
            return i + 1
        if char == '"':
            self._start_value(char, [], self._key_read)
            return i
        self._state = self._dead  # not a member: the object never completes, and nothing after it counts
        return i

    def _key_read(self) -> None:
        self._key = loads_or_none("".join(self._sink or ()))
        self._state = self._colon

    def _colon(self, text: str, i: int) -> int:
        if text[i] in WHITESPACE:
            return i + 1
        if text[i] != ":":
            self._state = self._dead
            return i
        self._state = self._value_start
        return i + 1

    def _value_start(self, text: str, i: int) -> int:
        if text[i] in WHITESPACE:
            return i + 1
        call, first = self._call, text[i]
        assert call is not None, "a member is inside a call"
        if self._key in ARGUMENT_KEYS and not call.has_arguments:
            call.has_arguments = True
            self._start_value(first, call.arguments, self._member_done)
        elif self._key == NAME_KEY:
            self._start_value(first, [], self._name_read)
        else:
            self._start_value(first, None, self._member_done)
        return i

    def _name_read(self) -> None:
        assert self._call is not None and self._sink is not None
        name = loads_or_none("".join(self._sink))
        self._call.name = name if isinstance(name, str) else None
        self._member_done()

    def _member_done(self) -> None:
        self._state = self._after_value

    def _after_value(self, text: str, i: int) -> int:
        if text[i] in WHITESPACE:
            return i + 1
        self._state = self._key_or_end
        return i + 1 if text[i] == "," else i

    def _dead(self, text: str, i: int) -> int:
        return len(text)

    # ---- values -----------------------------------------------------------------------------------

    def _start_value(self, first: str, sink: list[str] | None, on_end: Callable[[], None]) -> None:
        """The value whose first character, `first`, is next: its text goes to sink, then on_end runs."""
        self._value = ValueScan(scalar=first not in '"{[')
        self._sink, self._on_value_end = sink, on_end
        self._state = self._in_value

    def _in_value(self, text: str, i: int) -> int:
        end, done = self._value.feed(text, i)
        if self._sink is not None and end > i:
            self._sink.append(text[i:end])
        if done:
            self._on_value_end()
        return end

    def _end_call(self) -> None:
        assert self._call is not None
        if not self._call.has_arguments:
            self._call.arguments.append("{}")  # as PartialCall.arguments gives a complete call without any
        self._call.complete, self._call = True, None
        self._state = self._after_call


class ArgumentsScanner(CallScanner):
    """NamedFormat's text: one call to function_name whose arguments are the whole text (after whitespace)."""

    def __init__(self, function_name: str) -> None:
        super().__init__()
        self._call = ScannedCall(name=function_name, has_arguments=True)
        self._state = self._arguments_start
        self._after_call = self._dead

    def _arguments_start(self, text: str, i: int) -> int:
        if text[i] in WHITESPACE:
            return i + 1
        assert self._call is not None
        self._start_value(text[i], self._call.arguments, self._end_call)
        return i
