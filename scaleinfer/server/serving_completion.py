"""POST /v1/completions: CompletionRequest -> engine requests -> CompletionResponse or an SSE stream."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from scaleinfer.outputs import RequestOutput
from scaleinfer.server.errors import bad_request
from scaleinfer.server.logprobs import completion_logprobs, prompt_logprobs_out
from scaleinfer.server.protocol import CompletionChoice, CompletionRequest, CompletionResponse, PromptLogprobs
from scaleinfer.server.serving import (
    ChoiceDelta,
    EngineRequests,
    ServingContext,
    build_params,
    run_requests,
    sse,
)
from scaleinfer.server.unsupported import refuse_unsupported_completion

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


async def create_completion(ctx: ServingContext,
                            req: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
    arrival = time.monotonic()
    ctx.check_model(req.model)
    refuse_unsupported_completion(req.model_extra)
    if req.echo and req.logprobs is not None:
        raise bad_request("echo with logprobs is not supported; prompt_logprobs gives the prompt's logprobs", "echo")
    raw_prompts = normalize_prompts(req.prompt)
    ctx.limits.check_prompts(raw_prompts)
    ctx.limits.check_admissible(req.n, len(raw_prompts))
    max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    params = build_params(ctx, req, max_tokens, req.logprobs)
    prompts = await ctx.tokenizer.prompts(raw_prompts)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    return await run_requests(ctx, req, request_id, prompts, params, _stream, _response, arrival)


def normalize_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """One engine prompt per entry (a string or token ids); the engine checks each one."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt must not be an empty list", "prompt")
    if isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


def _response(ctx: ServingContext, req: CompletionRequest, request_id: str,
              requests: EngineRequests) -> CompletionResponse:
    tracker = requests.delta_tracker()
    choices = [_choice(ctx, delta, 0, _echo(ctx, req, requests.prompt_texts[i], output), prompt_logprobs_out(output))
               for i, output in enumerate(requests.latest) if output is not None for delta in tracker.deltas(i, output)]
    choices.sort(key=lambda choice: choice.index)
    return CompletionResponse(id=request_id, model=req.model, choices=choices, usage=requests.usage())


def _choice(ctx: ServingContext, delta: ChoiceDelta, text_offset: int, echo: str = "",
            prompt_logprobs: PromptLogprobs | None = None) -> CompletionChoice:
    logprobs = completion_logprobs(ctx.engine.tokenizer, delta.output, delta.token_start, text_offset)
    return CompletionChoice(index=delta.index, text=echo + delta.text, logprobs=logprobs,
                            finish_reason=delta.finish_reason, prompt_logprobs=prompt_logprobs)


def _echo(ctx: ServingContext, req: CompletionRequest, text: str | None, output: RequestOutput) -> str:
    """With echo, the prompt text that precedes a choice's text (token-id prompts are decoded)."""
    if not req.echo:
        return ""
    if text is not None:
        return text
    tokenizer = ctx.engine.tokenizer
    return tokenizer.decode(output.prompt_token_ids) if tokenizer is not None else ""


async def _stream(ctx: ServingContext, req: CompletionRequest, request_id: str,
                  requests: EngineRequests) -> AsyncIterator[str]:
    tracker = requests.delta_tracker()
    echoed: set[int] = set()  # choices whose first chunk (which carries the echoed prompt) went out
    try:
        async for index, output in requests.outputs():
            for delta in tracker.deltas(index, output):
                offset = len(delta.output.text) - len(delta.text)
                echo = "" if delta.index in echoed else _echo(ctx, req, requests.prompt_texts[index], output)
                echoed.add(delta.index)
                choice = _choice(ctx, delta, offset, echo)
                yield sse(CompletionResponse(id=request_id, model=req.model, choices=[choice]))
        if req.include_usage:
            yield sse(CompletionResponse(id=request_id, model=req.model, choices=[], usage=requests.usage()))
    finally:
        requests.close()
