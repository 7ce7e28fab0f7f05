"""POST /v1/completions: CompletionRequest -> engine requests -> CompletionResponse or an SSE stream.

echo puts the prompt's text before each choice's (in its first chunk when streaming); with logprobs too, the
prompt's tokens come first in the logprobs, as OpenAI sends them: the engine scores the prompt (prompt
logprobs, which arrive with the first output) and the first prompt token has no logprob."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from scaleinfer.outputs import RequestOutput
from scaleinfer.sampling_params import SamplingParams
from scaleinfer.server.errors import bad_request
from scaleinfer.server.logprobs import completion_logprobs, echo_logprobs, joined, prompt_logprobs_out
from scaleinfer.server.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
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
    raw_prompts = normalize_prompts(req.prompt)
    ctx.limits.check_prompts(raw_prompts)
    ctx.limits.check_admissible(req.n, len(raw_prompts))
    max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    params = _scoring_echo(req, build_params(ctx, req, max_tokens, req.logprobs))
    prompts = await ctx.tokenizer.prompts(raw_prompts, req.add_special_tokens)
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


def _scoring_echo(req: CompletionRequest, params: SamplingParams) -> SamplingParams:
    """echo with logprobs: the prompt is scored with as many alternatives as the logprobs (or prompt_logprobs)."""
    if not req.echo or req.logprobs is None:
        return params
    return dataclasses.replace(params, prompt_logprobs=max(req.logprobs, params.prompt_logprobs or 0))


@dataclass(slots=True)
class Echo:
    """What precedes every choice of one prompt with echo: its text, and with logprobs its tokens'."""

    text: str = ""
    logprobs: CompletionLogprobs | None = None


def _echo(ctx: ServingContext, req: CompletionRequest, text: str | None, output: RequestOutput) -> Echo:
    """An empty Echo without echo. output: the request's first (token-id prompts are decoded), which carries the
    prompt logprobs."""
    if not req.echo:
        return Echo()
    tokenizer = ctx.engine.tokenizer
    if text is None:
        text = tokenizer.decode(output.prompt_token_ids) if tokenizer is not None else ""
    logprobs = None if req.logprobs is None else echo_logprobs(tokenizer, output, req.logprobs)
    return Echo(text, logprobs)


def _choice(ctx: ServingContext, delta: ChoiceDelta, echo: Echo, first: bool,
            output: RequestOutput | None = None) -> CompletionChoice:
    """first: the choice's first chunk, which carries the echo; output: the final one (prompt_logprobs)."""
    logprobs = completion_logprobs(ctx.engine.tokenizer, delta.output, len(echo.text) + delta.text_offset)
    if first and echo.logprobs is not None:
        logprobs = joined(echo.logprobs, logprobs)
    prompt_logprobs = None if output is None else prompt_logprobs_out(output)
    return CompletionChoice(index=delta.index, text=(echo.text if first else "") + delta.text, logprobs=logprobs,
                            finish_reason=delta.finish_reason, prompt_logprobs=prompt_logprobs)


def _response(ctx: ServingContext, req: CompletionRequest, request_id: str,
              requests: EngineRequests) -> CompletionResponse:
    tracker, choices = requests.delta_tracker(), []
    for i, output in enumerate(requests.latest):
        if output is not None:
            echo = _echo(ctx, req, requests.prompt_texts[i], output)
            shown = output if req.prompt_logprobs is not None else None  # vLLM's prompt_logprobs field
            choices += [_choice(ctx, delta, echo, True, shown) for delta in tracker.deltas(i, output)]
    choices.sort(key=lambda choice: choice.index)
    return CompletionResponse(id=request_id, model=req.model, choices=choices, usage=requests.usage())


async def _stream(ctx: ServingContext, req: CompletionRequest, request_id: str,
                  requests: EngineRequests) -> AsyncIterator[str]:
    tracker = requests.delta_tracker()
    echoes: dict[int, Echo] = {}  # prompt index -> its echo, from the request's first output
    echoed: set[int] = set()  # choices whose first chunk (which carries the echo) went out
    try:
        async for index, output in requests.outputs():
            if index not in echoes:
                echoes[index] = _echo(ctx, req, requests.prompt_texts[index], output)
            echo = echoes[index]
            for delta in tracker.deltas(index, output):
                first = delta.index not in echoed
                echoed.add(delta.index)
                choice = _choice(ctx, delta, echo, first)
                usage = requests.usage() if req.continuous_usage else None
                yield sse(CompletionResponse(id=request_id, model=req.model, choices=[choice], usage=usage))
        if req.include_usage:
            yield sse(CompletionResponse(id=request_id, model=req.model, choices=[], usage=requests.usage()))
    finally:
        requests.close()
