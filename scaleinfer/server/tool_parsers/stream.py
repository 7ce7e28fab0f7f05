"""One choice's streamed text -> OpenAI deltas: content until a call begins, then per call a header (index,
id, type, function name) and its argument fragments. Fed the cumulative text each time; never sends a
character twice or takes one back."""

from __future__ import annotations

from dataclasses import dataclass, field

from scaleinfer.server.tool_parsers.format import ToolCallFormat, new_call_id


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
    id: str
    num_chars: int = 0  # of its arguments


@dataclass(slots=True)
class ToolCallStream:
    format: ToolCallFormat
    parallel_tool_calls: bool = True
    _num_content: int = 0  # characters of content sent
    _start: int | None = None  # where the calls begin, once seen
    _calls: list[_SentCall] = field(default_factory=list)

    @property
    def called(self) -> bool:
        """Whether a tool call was sent (the finish reason is then "tool_calls")."""
        return bool(self._calls)

    def update(self, text: str, finished: bool) -> StreamDelta:
        if self._start is None:
            self._start = self.format.region_start(text)
        if self._start is None:
            return StreamDelta(self._content(text, len(text) if finished else len(text) - self.format.held_tail(text)))
        delta = StreamDelta(self._content(text, self._start), self._call_deltas(text))
        if finished and not self._calls:  # the calls never parsed: what was held is content after all
            delta.content += self._content(text, len(text))
        return delta

    def _content(self, text: str, end: int) -> str:
        start, self._num_content = self._num_content, max(self._num_content, end)
        return text[start:self._num_content]

    def _call_deltas(self, text: str) -> list[ToolCallDelta]:
        calls = self.format.scan(text, self._start)
        if not self.parallel_tool_calls:
            calls = calls[:1]
        deltas = []
        for index, call in enumerate(calls):
            if index == len(self._calls) and call.name is not None:
                self._calls.append(_SentCall(new_call_id()))
                deltas.append(ToolCallDelta(index, self._calls[index].id, call.name))
            if index >= len(self._calls):
                break
            sent = self._calls[index]
            fragment = call.arguments(text)[sent.num_chars:]
            sent.num_chars += len(fragment)
            if fragment and deltas and deltas[-1].index == index:
                deltas[-1].arguments = fragment
            elif fragment:
                deltas.append(ToolCallDelta(index, arguments=fragment))
        return deltas
