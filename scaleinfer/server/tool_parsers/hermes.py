"""Hermes / Qwen2.5: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one tag per call."""

from __future__ import annotations

from scaleinfer.server.tool_parsers.format import ToolCallFormat


class HermesFormat(ToolCallFormat):
    name = "hermes"
    markers = ("<tool_call>",)
    # Qwen2.5 adds <tool_call> as a token that is not special; a model that marks it special needs it kept.
    skip_special_tokens = False
