"""Llama 3.1 / 3.2 JSON tool calls: the message is `{"name": ..., "parameters": {...}}` (several joined by
`;`), optionally after `<|python_tag|>`. A message that does not begin with either is content."""

from __future__ import annotations

from scaleinfer.server.tool_parsers.format import ToolCallFormat

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonFormat(ToolCallFormat):
    name = "llama3_json"
    markers = (PYTHON_TAG,)
    skip_special_tokens = False  # <|python_tag|> is special

    def region_start(self, text: str) -> int | None:
        begin = len(text) - len(text.lstrip())
        return begin if text.startswith(("{", PYTHON_TAG), begin) else None

    def held_tail(self, text: str) -> int:
        """A start of <|python_tag|> after the leading whitespace may still open a call (the whitespace is
        content either way: text before the calls)."""
        stripped = text.lstrip()
        return len(stripped) if PYTHON_TAG.startswith(stripped) else 0

    def content_only(self, text: str) -> bool:
        """The message began with something else than a call."""
        return bool(text.strip()) and self.held_tail(text) == 0 and self.region_start(text) is None
