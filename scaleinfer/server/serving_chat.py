"""POST /v1/chat/completions: messages -> the model's chat template -> one engine request -> a
ChatCompletionResponse or an SSE stream of chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from scaleinfer.errors import InvalidRequestError
from scaleinfer.sampling_params import MAX_LOGPROBS
from scaleinfer.server.errors import bad_request
from scaleinfer.server.logprobs import chat_logprobs, prompt_logprobs_out
from scaleinfer.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    DeltaMessage,
    Usage,
)
from scaleinfer.server.serving import (
    EngineRequests,
    ServingContext,
    build_params,
    run_requests,
    sse,
)
from scaleinfer.server.serving_tools import (
    ToolCallStreams,
    ToolPlan,
    apply_plan,
    message_fields,
    message_out,
    plan_tools,
)
from scaleinfer.server.tokenizing import Prompt
from scaleinfer.server.unsupported import refuse_unsupported_chat


async def create_chat_completion(ctx: ServingContext,
                                 req: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
    arrival = time.monotonic()
    ctx.check_model(req.model)
    refuse_unsupported_chat(req.model_extra, [m.model_extra for m in req.messages])
    conversation = conversation_of(ctx, req.messages)
    plan = plan_tools(req, ctx.tool_call_parser)
    ctx.limits.check_admissible(req.n, 1)
    prompt_ids = await render_chat(ctx, conversation, tools=plan.tools)
    params = build_params(ctx, req, _max_tokens(ctx, req, len(prompt_ids)), _num_logprobs(req))
    params = apply_plan(params, plan)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    return await run_requests(ctx, req, request_id, [Prompt(prompt_ids, None)], params, partial(_stream, plan),
                              partial(_response, plan), arrival)


def conversation_of(ctx: ServingContext, messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the chat template takes them, within the size bound (checked before tokenizing)."""
    if not messages:
        raise bad_request("messages must not be empty", "messages")
    if not ctx.tokenizer.has_tokenizer:
        raise bad_request("chat needs a tokenizer; this engine was started without one", "messages")
    if not getattr(ctx.engine.tokenizer, "chat_template", None):
        raise bad_request(f"model {ctx.model_name!r} has no chat template, which /v1/chat/completions needs: "
                          "start the server with --chat-template (a file or the template), or use /v1/completions",
                          "messages")
    conversation = [{"role": m.role, "content": _text_of(m), **message_fields(i, m)} for i, m in enumerate(messages)]
    ctx.limits.check_chars(sum(len(m["content"]) for m in conversation), "messages", "messages")
    return conversation


async def render_chat(ctx: ServingContext, conversation: list[dict[str, Any]],
                      add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Prompt token ids of the conversation under the model's chat template, as LLM.chat builds them."""
    try:
        return await ctx.tokenizer.chat(conversation, add_generation_prompt, tools)
    except InvalidRequestError as exc:
        raise bad_request(str(exc), "messages") from exc
    except Exception as exc:  # a template that rejects these messages (a role it does not know, ...)
        raise bad_request(f"messages do not fit the chat template: {exc}", "messages") from exc


def _text_of(message: ChatMessage) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise bad_request(f"only text content parts are supported, got type {part.type!r}", "messages")
    return "".join(part.text or "" for part in message.content)


def _max_tokens(ctx: ServingContext, req: ChatCompletionRequest, num_prompt_tokens: int) -> int:
    """The request's limit, else all the context the prompt leaves (at least 1; the engine checks the rest)."""
    for value in (req.max_completion_tokens, req.max_tokens):
        if value is not None:
            return value
    return max(1, ctx.engine.max_model_len - num_prompt_tokens)


def _num_logprobs(req: ChatCompletionRequest) -> int | None:
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_LOGPROBS:  # not SamplingParams' "logprobs"
        raise bad_request(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {req.top_logprobs}", "top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


def _response(plan: ToolPlan, ctx: ServingContext, req: ChatCompletionRequest, request_id: str,
              requests: EngineRequests) -> ChatCompletionResponse:
    output = requests.latest[0]
    assert output is not None, "a finished request has an output"
    choices = [ChatChoice(index=c.index, message=message, finish_reason=finish_reason,
                          logprobs=chat_logprobs(ctx.engine.tokenizer, c, req.top_logprobs or 0))
               for c in output.outputs for message, finish_reason in [message_out(plan, c)]]
    return ChatCompletionResponse(id=request_id, model=req.model, choices=choices, usage=requests.usage(),
                                  prompt_logprobs=prompt_logprobs_out(output))


async def _stream(plan: ToolPlan, ctx: ServingContext, req: ChatCompletionRequest, request_id: str,
                  requests: EngineRequests) -> AsyncIterator[str]:
    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        usage = usage or (requests.usage() if req.continuous_usage else None)
        return sse(ChatCompletionChunk(id=request_id, model=req.model, choices=choices, usage=usage))

    tracker, tool_streams = requests.delta_tracker(), ToolCallStreams(plan)
    try:
        yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                     for i in range(req.n)])
        async for _, output in requests.outputs():
            for d in tracker.deltas(0, output):
                logprobs = chat_logprobs(ctx.engine.tokenizer, d.output, req.top_logprobs or 0)
                s = tool_streams.delta(d)
                if s.content or s.tool_calls or s.finish_reason or logprobs or plan.format is None:
                    delta = DeltaMessage(content=s.content, tool_calls=s.tool_calls)
                    yield chunk([ChatChunkChoice(index=d.index, delta=delta, logprobs=logprobs,
                                                 finish_reason=s.finish_reason)])
        if req.include_usage:
            yield chunk([], requests.usage())
    finally:
        requests.close()
