"""The formats of tool_choice "required" and a named function, whose output structured outputs constrain
to a JSON schema (as vLLM does): the named function's arguments object, or an array of
{"name", "parameters"} objects, one per call. Neither has content."""

from __future__ import annotations

from typing import Any

from scaleinfer.server.tool_parsers.format import ToolCallFormat
from scaleinfer.server.tool_parsers.json_feed import ArgumentsScanner, CallScanner
from scaleinfer.server.tool_parsers.json_scan import PartialCall, skip_whitespace, value_end


class RequiredFormat(ToolCallFormat):
    """A JSON array of calls; the text is the calls from its first character."""

    name = "required"

    def region_start(self, text: str) -> int | None:
        return 0

    def held_tail(self, text: str) -> int:
        return 0


class NamedFormat(RequiredFormat):
    """The whole text is the arguments of one call to `function_name`."""

    name = "named"

    def __init__(self, function_name: str) -> None:
        self.function_name = function_name

    def scan(self, text: str, start: int) -> list[PartialCall]:
        args_start = skip_whitespace(text, start)
        end = value_end(text, args_start)
        return [PartialCall(self.function_name, args_start, end, end)]

    def call_scanner(self) -> CallScanner:
        return ArgumentsScanner(self.function_name)


def required_schema(tools: list[dict[str, Any]], parallel_tool_calls: bool) -> dict[str, Any]:
    """JSON schema of an array of calls to any of the tools (OpenAI tool dicts)."""
    calls = [_call_schema(tool["function"]) for tool in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    return schema


def named_schema(tools: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return parameters_schema(next(t["function"] for t in tools if t["function"]["name"] == name))


def parameters_schema(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object", "properties": {}}


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["name", "parameters"],
            "properties": {"name": {"type": "string", "enum": [function["name"]]},
                           "parameters": parameters_schema(function)}}
