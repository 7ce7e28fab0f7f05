"""One choice's streamed text -> OpenAI deltas: content until a call begins, then per call a header (index,
id, type, function name) and its argument fragments. Fed each new piece of the text once; never sends a
character twice or takes one back.

Before the calls, only a tail that may still become a marker (shorter than the marker) is held back and
searched again with the next piece; once they begin, a CallScanner keeps its place in their JSON. A piece
costs O(its length), whatever came before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scaleinfer.server.tool_parsers.format import ToolCallFormat, new_call_id
from scaleinfer.server.tool_parsers.json_feed import CallScanner, ScannedCall


@dataclass(slots=True)
class ToolCallDelta:
    index: int
    id: str | None = None  # with type and name in a call's first delta only
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class StreamDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass(slots=True)
class _SentCall:
    call: ScannedCall
    index: int


@dataclass(slots=True)
class ToolCallStream:
    format: ToolCallFormat
    parallel_tool_calls: bool = True
    _held: str = ""  # content not sent yet: what may still begin a marker
    _content_only: bool = False  # no call can begin any more
    _scanner: CallScanner | None = None  # once the calls begin
    _region: list[str] | None = None  # the calls' text until one is sent: content after all if none is
    _open: _SentCall | None = None  # the call being sent
    _num_calls: int = 0  # sent
    _done: bool = False  # the one call that parallel_tool_calls=False allows is sent whole: the rest is dropped
    _num_examined: int = 0  # characters read before the calls

    @property
    def called(self) -> bool:
        """Whether a tool call was sent (the finish reason is then "tool_calls")."""
        return self._num_calls > 0

    @property
    def examined(self) -> int:
        """Characters read so far (the marker search and the scanner's), for tests of the cost per piece."""
        return self._num_examined + (self._scanner.examined if self._scanner is not None else 0)

    def feed(self, text: str, finished: bool) -> StreamDelta:
        """The choice's next piece of text (finished: its last) -> what to send for it."""
        out = StreamDelta()
        if self._scanner is None:
            text = self._before_calls(text, finished, out)
        if self._scanner is None:
            return out
        if self._region is not None:
            self._region.append(text)
        if not self._done:
            out.tool_calls = self._call_deltas(self._scanner.feed(text))
        if finished and self._region is not None:  # the calls never parsed: their text is content after all
            out.content += "".join(self._region)
        return out

    def _before_calls(self, text: str, finished: bool, out: StreamDelta) -> str:
        """Send the content of held + text; the calls' part of it when they begin there ("" before)."""
        if self._content_only:
            out.content = text
            return ""
        text, self._held = self._held + text, ""
        self._num_examined += len(text)
        start = self.format.region_start(text)
        if start is not None:
            out.content, self._scanner, self._region = text[:start], self.format.call_scanner(), []
            return text[start:]
        num_held = 0 if finished else self.format.held_tail(text)
        out.content, self._held = text[:len(text) - num_held], text[len(text) - num_held:]
        self._content_only = self.format.content_only(text)
        return ""

    def _call_deltas(self, calls: list[ScannedCall]) -> list[ToolCallDelta]:
        deltas: list[ToolCallDelta] = []
        for call in calls:
            if self._open is None or self._open.call is not call:
                if call.name is None:  # none yet, or a complete object without one: not a call (as extract)
                    continue
                if self._num_calls and not self.parallel_tool_calls:
                    self._done = True
                    break
                self._open = self._header(call, deltas)
            fragment = call.take_arguments()
            if fragment and deltas and deltas[-1].index == self._open.index:
                deltas[-1].arguments += fragment
            elif fragment:
                deltas.append(ToolCallDelta(self._open.index, arguments=fragment))
            if call.complete and not self.parallel_tool_calls:
                self._done = True
                break
        return deltas

    def _header(self, call: ScannedCall, deltas: list[ToolCallDelta]) -> _SentCall:
        sent = _SentCall(call, self._num_calls)
        deltas.append(ToolCallDelta(sent.index, new_call_id(), call.name))
        self._num_calls += 1
        self._region = None
        return sent
