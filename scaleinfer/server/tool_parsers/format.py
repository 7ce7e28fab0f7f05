"""What a tool-call format is (where a model's calls begin in its text) and the whole-text extraction.

A format names the markers that open its calls; the calls are JSON objects from there on, each with a
name and its arguments (json_scan.py reads them, also from a prefix of the text). Content is the text
before the first call; text after the last call is dropped (as vLLM's parsers do).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import ClassVar

from scaleinfer.server.tool_parsers.json_feed import CallScanner
from scaleinfer.server.tool_parsers.json_scan import PartialCall, scan_calls


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object, as the model wrote it


@dataclass(slots=True)
class ExtractedMessage:
    content: str | None
    tool_calls: list[ToolCall]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallFormat:
    """A model family's way of writing tool calls: `markers` open the calls (the earliest one found)."""

    name: ClassVar[str] = ""
    markers: ClassVar[tuple[str, ...]] = ()
    # False where a marker is a special token: the text must keep it (the request decodes with it).
    skip_special_tokens: ClassVar[bool] = True

    def region_start(self, text: str) -> int | None:
        """Where the calls begin in text, or None while (so far) it is all content."""
        found = [i for marker in self.markers if (i := text.find(marker)) != -1]
        return min(found, default=None)

    def held_tail(self, text: str) -> int:
        """Characters at the end of text that may yet become a marker: not streamed as content yet.
        Streaming asks it (and region_start) about the held tail and the new piece only, not all the text."""
        return max((k for m in self.markers for k in range(min(len(m) - 1, len(text)), 0, -1)
                    if text.endswith(m[:k])), default=0)

    def content_only(self, text: str) -> bool:
        """Whether no call can begin after this text (which has none): the rest of the message is content."""
        return False

    def scan(self, text: str, start: int) -> list[PartialCall]:
        return scan_calls(text, start)

    def call_scanner(self) -> CallScanner:
        """What reads the calls' text as it streams in (scan's reading, a piece at a time)."""
        return CallScanner()

    def extract(self, text: str, parallel_tool_calls: bool = True) -> ExtractedMessage:
        """The finished text as content and tool calls; all content when no call parses."""
        start = self.region_start(text)
        if start is None:
            return ExtractedMessage(text, [])
        calls = [c for c in self.scan(text, start) if c.complete and c.name is not None]
        arguments = [c.arguments(text) for c in calls]
        if not calls or not all(map(is_json_object, arguments)):
            return ExtractedMessage(text, [])
        if not parallel_tool_calls:
            calls, arguments = calls[:1], arguments[:1]
        tool_calls = [ToolCall(new_call_id(), c.name, a) for c, a in zip(calls, arguments)]
        return ExtractedMessage(text[:start].strip() or None, tool_calls)


def is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False
