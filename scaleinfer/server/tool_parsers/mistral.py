"""Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`; [TOOL_CALLS] is a special token, so
the request's text keeps special tokens."""

from __future__ import annotations

from scaleinfer.server.tool_parsers.format import ToolCallFormat


class MistralFormat(ToolCallFormat):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    skip_special_tokens = False
