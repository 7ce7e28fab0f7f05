"""Tool calling on /v1/chat/completions: what the chat template is given (tools, earlier calls, tool results),
how the output is read back (the server's tool-call format), and the calls in OpenAI's two shapes.

tool_choice "auto" (the default with tools) parses the output with the server's format: `--tool-call-parser`,
else the one the chat template's syntax names. "none" renders the tools into the prompt as vLLM does, but
reads the output as content only. "required" and a named function constrain the output with structured
outputs (as vLLM does): to a JSON array of {"name", "parameters"} calls, or to the function's arguments;
such a request cannot also set response_format or another structured-output field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from scaleinfer.outputs import CompletionOutput
from scaleinfer.sampling_params import SamplingParams, StructuredOutputsParams
from scaleinfer.server.errors import bad_request
from scaleinfer.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    ChatMessageOut,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCallOut,
    ToolCallOut,
)
from scaleinfer.server.serving import ChoiceDelta
from scaleinfer.server.tool_parsers import ToolCallDelta, ToolCallFormat, ToolCallStream, parser_named
from scaleinfer.server.tool_parsers.forced import NamedFormat, RequiredFormat, named_schema, required_schema


@dataclass(slots=True)
class ToolPlan:
    """How one chat request treats tools."""

    tools: list[dict[str, Any]] | None = None  # as the chat template takes them (OpenAI's dicts)
    format: ToolCallFormat | None = None  # reads calls out of the output; None: all of it is content
    parallel_tool_calls: bool = True
    schema: dict[str, Any] | None = None  # the JSON schema the output is constrained to (required, named)


def plan_tools(req: ChatCompletionRequest, tool_call_parser: str | None) -> ToolPlan:
    """tool_call_parser: the server's format name (given or found in the template), or None."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return ToolPlan()
    tools = [tool.model_dump(exclude_none=True) for tool in req.tools]
    if choice == "none":
        return ToolPlan(tools)
    if choice in (None, "auto"):
        return ToolPlan(tools, _auto_format(tool_call_parser), req.parallel_tool_calls)
    if choice == "required":
        return ToolPlan(tools, RequiredFormat(), req.parallel_tool_calls,
                        required_schema(tools, req.parallel_tool_calls))
    name = choice.function.name
    if name not in [tool["function"]["name"] for tool in tools]:
        raise bad_request(f"tool_choice names the function {name!r}, which is not among the tools", "tool_choice")
    return ToolPlan(tools, NamedFormat(name), False, named_schema(tools, name))


def _auto_format(tool_call_parser: str | None) -> ToolCallFormat:
    if tool_call_parser is None:
        raise bad_request("tool_choice 'auto' needs a tool-call format: this server's chat template names none; "
                          "start it with --tool-call-parser (hermes, llama3_json or mistral)", "tool_choice")
    return parser_named(tool_call_parser)


def apply_plan(params: SamplingParams, plan: ToolPlan) -> SamplingParams:
    """The schema of a forced call; a format whose markers are special tokens needs them kept in the text."""
    if plan.schema is not None:
        if params.structured_outputs is not None:
            raise bad_request("tool_choice 'required' or a named function constrains the output itself: it "
                              "cannot be combined with response_format or structured outputs", "tool_choice")
        return dataclasses.replace(params, structured_outputs=StructuredOutputsParams(json=plan.schema))
    if plan.format is None or plan.format.skip_special_tokens:
        return params
    return dataclasses.replace(params, skip_special_tokens=False)


# ---- the history ------------------------------------------------------------------------------------


def message_fields(index: int, message: ChatMessage) -> dict[str, Any]:
    """A message's tool fields for the chat template: earlier calls with their arguments as objects (as
    vLLM gives templates, which write them with tojson), the call a tool message answers."""
    fields: dict[str, Any] = {}
    if message.tool_calls:
        fields["tool_calls"] = [_history_call(index, j, call) for j, call in enumerate(message.tool_calls)]
    if message.tool_call_id is not None:
        fields["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        fields["name"] = message.name
    return fields


def _history_call(index: int, j: int, call: Any) -> dict[str, Any]:
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise bad_request(f"messages[{index}].tool_calls[{j}].function.arguments must be a JSON object, got "
                          f"{call.function.arguments[:200]!r}", "messages")
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}


# ---- the output -------------------------------------------------------------------------------------


def message_out(plan: ToolPlan, output: CompletionOutput) -> tuple[ChatMessageOut, str | None]:
    """The choice's message and finish reason ("tool_calls" when it ended calling tools)."""
    if plan.format is None:
        return ChatMessageOut(content=output.text), output.finish_reason
    extracted = plan.format.extract(output.text, plan.parallel_tool_calls)
    if not extracted.tool_calls:
        return ChatMessageOut(content=output.text), output.finish_reason
    calls = [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
             for c in extracted.tool_calls]
    return ChatMessageOut(content=extracted.content, tool_calls=calls), _finish_reason(output.finish_reason, True)


def _finish_reason(reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and reason == "stop" else reason


@dataclass(slots=True)
class StreamedChoice:
    content: str | None
    tool_calls: list[DeltaToolCall] | None
    finish_reason: str | None


@dataclass(slots=True)
class ToolCallStreams:
    """The streamed choices of one request: each choice's ToolCallStream, fed its new text only."""

    plan: ToolPlan
    _streams: dict[int, ToolCallStream] = field(default_factory=dict)

    def delta(self, d: ChoiceDelta) -> StreamedChoice:
        if self.plan.format is None:
            return StreamedChoice(d.text, None, d.finish_reason)
        stream = self._streams.get(d.index)
        if stream is None:
            stream = self._streams[d.index] = ToolCallStream(self.plan.format, self.plan.parallel_tool_calls)
        out = stream.feed(d.text, d.finish_reason is not None)
        calls = [_delta_call(c) for c in out.tool_calls] or None
        return StreamedChoice(out.content, calls, _finish_reason(d.finish_reason, stream.called))


def _delta_call(call: ToolCallDelta) -> DeltaToolCall:
    if call.id is None:
        return DeltaToolCall(index=call.index, function=DeltaFunctionCall(arguments=call.arguments))
    return DeltaToolCall(index=call.index, id=call.id, type="function",
                         function=DeltaFunctionCall(name=call.name, arguments=call.arguments))
