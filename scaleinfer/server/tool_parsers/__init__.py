"""Tool-call parsers: a model's text -> content and tool calls, whole or as it streams. One file per format;
the format is named by `serve --tool-call-parser` or found in the chat template."""

from __future__ import annotations

from scaleinfer.errors import InvalidRequestError
from scaleinfer.server.tool_parsers.format import ExtractedMessage, ToolCall, ToolCallFormat
from scaleinfer.server.tool_parsers.hermes import HermesFormat
from scaleinfer.server.tool_parsers.llama3_json import PYTHON_TAG, Llama3JsonFormat
from scaleinfer.server.tool_parsers.mistral import MistralFormat
from scaleinfer.server.tool_parsers.stream import StreamDelta, ToolCallDelta, ToolCallStream

PARSERS: dict[str, type[ToolCallFormat]] = {
    "hermes": HermesFormat,  # also Qwen2.5's
    "llama3_json": Llama3JsonFormat,
    "mistral": MistralFormat,
}

# What in a chat template tells its format, checked in this order.
_TEMPLATE_SIGNS = (("<tool_call>", "hermes"), ("[TOOL_CALLS]", "mistral"), (PYTHON_TAG, "llama3_json"),
                   ("ipython", "llama3_json"))

__all__ = ["PARSERS", "ExtractedMessage", "StreamDelta", "ToolCall", "ToolCallDelta", "ToolCallFormat",
           "ToolCallStream", "detect_parser", "parser_named", "resolve_parser"]


def parser_named(name: str) -> ToolCallFormat:
    if name not in PARSERS:
        raise InvalidRequestError(f"tool call parser {name!r} is not one of {sorted(PARSERS)}")
    return PARSERS[name]()


def resolve_parser(name: str | None, chat_template: str | None, enable_auto_tool_choice: bool = False) -> str | None:
    """The server's format: the one named (checked), else the chat template's. enable_auto_tool_choice (vLLM's
    flag) makes finding none an error at start-up rather than a 400 on the first tool_choice 'auto'."""
    if name is not None:
        return parser_named(name).name
    found = detect_parser(chat_template)
    if found is None and enable_auto_tool_choice:
        raise InvalidRequestError("--enable-auto-tool-choice: the chat template names no tool-call format; give "
                                  f"--tool-call-parser, one of {sorted(PARSERS)}")
    return found


def detect_parser(chat_template: str | None) -> str | None:
    """The parser a chat template's tool-call syntax names, or None."""
    return next((name for sign, name in _TEMPLATE_SIGNS if sign in (chat_template or "")), None)
