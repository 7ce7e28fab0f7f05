"""What completions and chat completions share: request -> SamplingParams, the engine requests behind one
HTTP request (one per prompt) with their latency metrics, streaming deltas, usage, and SSE framing.

A streamed request asks the engine for DELTA outputs (each carries only the step's new text, token ids and
logprobs, so a chunk costs what it adds, not what came before); a non-streamed one for its FINAL_ONLY output."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from scaleinfer.engine.async_embedder import AsyncEmbedder
from scaleinfer.engine.async_engine import AsyncLLMEngine, RequestStream
from scaleinfer.outputs import CompletionOutput, RequestOutput
from scaleinfer.sampling_params import RequestOutputKind, SamplingParams
from scaleinfer.server.errors import ApiError, bad_request, to_api_error
from scaleinfer.server.limits import RequestLimits
from scaleinfer.server.metrics import RequestTiming, ServerMetrics
from scaleinfer.server.protocol import SamplingRequest, Usage
from scaleinfer.server.structured import structured_outputs
from scaleinfer.server.tokenizing import Prompt, PromptTokenizer
from scaleinfer.server.tool_parsers import resolve_parser

SSE_DONE = "data: [DONE]\n\n"


@dataclass(slots=True)
class ServingContext:
    engine: AsyncLLMEngine | AsyncEmbedder  # an AsyncEmbedder when serving an encoder (task "embed")
    metrics: ServerMetrics
    limits: RequestLimits
    tokenizer: PromptTokenizer
    model_name: str  # what /v1/models lists and requests must name
    tool_call_parser: str | None = None  # the tool-call format of tool_choice "auto" (serving_tools.py)

    @classmethod
    def create(cls, engine: AsyncLLMEngine | AsyncEmbedder, max_n: int = 16, served_model_name: str | None = None,
               tool_call_parser: str | None = None, enable_auto_tool_choice: bool = False) -> ServingContext:
        limits = RequestLimits(engine.max_model_len, engine.max_waiting, max_n)
        template = getattr(engine.tokenizer, "chat_template", None)
        return cls(engine, ServerMetrics(engine), limits, PromptTokenizer(engine.tokenizer),
                   served_model_name or engine.model_name,
                   resolve_parser(tool_call_parser, template, enable_auto_tool_choice))

    @property
    def task(self) -> str:
        return "embed" if isinstance(self.engine, AsyncEmbedder) else "generate"

    def require_task(self, task: str, route: str) -> None:
        """A route of the other task: 400 naming both tasks."""
        if self.task != task:
            raise bad_request(f"{route} needs a server started with --task {task}; this one serves "
                              f"{self.model_name!r} with --task {self.task}")

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ApiError(404, f"The model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")


def build_params(ctx: ServingContext, req: SamplingRequest, max_tokens: int,
                 logprobs: int | None) -> SamplingParams:
    """Raises InvalidRequestError (400) for values out of range (n: see RequestLimits.check_admissible)."""
    return SamplingParams(
        n=req.n, max_tokens=max_tokens, min_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, min_p=req.min_p or 0.0,
        seed=req.seed, stop=req.stop or [], stop_token_ids=req.stop_token_ids or [],
        include_stop_str_in_output=req.include_stop_str_in_output, skip_special_tokens=req.skip_special_tokens,
        ignore_eos=req.ignore_eos, logprobs=logprobs, prompt_logprobs=_prompt_logprobs(req),
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias=_token_id_keys(req.logit_bias or {}), structured_outputs=structured_outputs(req),
        output_kind=RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY)


def _prompt_logprobs(req: SamplingRequest) -> int | None:
    if req.stream and req.prompt_logprobs is not None:  # as vLLM: they would only fit the first chunk
        raise bad_request("prompt_logprobs are not available with stream=true", "prompt_logprobs")
    return req.prompt_logprobs


def _token_id_keys(logit_bias: dict[str, float]) -> dict[int, float]:
    try:
        return {int(token_id): bias for token_id, bias in logit_bias.items()}
    except ValueError:
        keys = [key for key in logit_bias if not key.lstrip("-").isdigit()]
        raise bad_request(f"logit_bias must have token ids as keys, got {keys[:5]}", "logit_bias") from None


async def run_requests(ctx: ServingContext, req: SamplingRequest, request_id: str, prompts: list[Prompt],
                       params: SamplingParams, stream: Callable[..., AsyncIterator[str]],
                       respond: Callable[..., Any], arrival: float) -> Any:
    """Admit the prompts, then either stream SSE chunks or wait for every output and build the response."""
    ctx.limits.check_tokens([prompt.num_tokens for prompt in prompts], params.max_tokens, params.n)
    requests = await open_requests(ctx, request_id, prompts, params, arrival)
    if req.stream:
        return with_error_event(stream(ctx, req, request_id, requests))
    try:
        await requests.final_outputs()
    finally:
        requests.close()
    return respond(ctx, req, request_id, requests)


async def open_requests(ctx: ServingContext, request_id: str, prompts: list[Prompt], params: SamplingParams,
                        arrival: float) -> EngineRequests:
    """Admit one engine request per prompt; all or none (the admitted ones are aborted on failure).
    arrival: time.monotonic() when the HTTP request came in."""
    ids = [request_id if len(prompts) == 1 else f"{request_id}-{i}" for i in range(len(prompts))]
    adds = [ctx.engine.add_request(rid, prompt.engine_prompt, params) for rid, prompt in zip(ids, prompts)]
    results = await asyncio.gather(*adds, return_exceptions=True)
    streams = [r for r in results if isinstance(r, RequestStream)]
    errors = [r for r in results if not isinstance(r, RequestStream)]
    if errors:
        for stream in streams:
            stream.close()
        raise errors[0]
    return EngineRequests(streams, params, ctx.metrics, [RequestTiming(arrival) for _ in streams],
                          [prompt.text for prompt in prompts], [prompt.num_tokens for prompt in prompts])


class EngineRequests:
    """The engine requests behind one HTTP request, iterated together and closed together. Their outputs are
    DELTA (streamed) or FINAL_ONLY: either way each token comes in exactly one output."""

    def __init__(self, streams: list[RequestStream], params: SamplingParams, metrics: ServerMetrics,
                 timings: list[RequestTiming], prompt_texts: list[str | None], num_prompt_tokens: list[int]) -> None:
        self.streams = streams
        self.params = params
        self.metrics = metrics
        self.timings = timings
        self.prompt_texts = prompt_texts  # as sent, where a prompt was text; the engine got token ids
        self.latest: list[RequestOutput | None] = [None] * len(streams)  # each request's last output read
        # known at admission where the front tokenized (a first chunk's usage counts them), then the engine's
        self._num_prompt_tokens = list(num_prompt_tokens)
        self._num_tokens = [[0] * params.n for _ in streams]  # [prompt][choice]: output tokens read so far

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) as each arrives; counts tokens and records latency metrics as they finish."""
        async for index, output in merge_streams(self.streams):
            self.latest[index] = output
            self._num_prompt_tokens[index] = len(output.prompt_token_ids)  # the engine's count (text prompts)
            for choice in output.outputs:
                self._num_tokens[index][choice.index] += len(choice.token_ids)
            self._time(index, output)
            yield index, output

    async def final_outputs(self) -> list[RequestOutput]:
        async for _ in self.outputs():
            pass
        return [output for output in self.latest if output is not None]

    def delta_tracker(self) -> DeltaTracker:
        return DeltaTracker(self.params.n)

    def close(self) -> None:
        for stream in self.streams:
            if stream.close():
                self.metrics.requests.labels("abort").inc()

    def usage(self) -> Usage:
        prompt = sum(self._num_prompt_tokens)
        completion = sum(map(sum, self._num_tokens))
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def _time(self, index: int, output: RequestOutput) -> None:
        timing = self.timings[index]
        num_tokens = max(self._num_tokens[index])
        if num_tokens > timing.num_tokens:
            now = time.monotonic()
            timing.first_token = timing.first_token or _first_token_time(now, output)
            timing.last_token, timing.num_tokens = now, num_tokens
        if output.finished:
            self.metrics.observe(timing, next((c.finish_reason for c in output.outputs if c.finish_reason), "stop"))


def _first_token_time(now: float, output: RequestOutput) -> float:
    """When the first token came (time.monotonic): now, unless this first output is the final one (FINAL_ONLY):
    then the front's interval from the first token to the finish, taken back from now."""
    metrics = output.metrics
    if not output.finished or metrics is None or metrics.first_token_time is None or metrics.finished_time is None:
        return now
    return now - max(0.0, metrics.finished_time - metrics.first_token_time)


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    pending = {asyncio.ensure_future(anext(stream)): i for i, stream in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = pending.pop(task)
                if isinstance(task.exception(), StopAsyncIteration):
                    continue
                output = task.result()
                pending[asyncio.ensure_future(anext(streams[index]))] = index
                yield index, output
    finally:
        for task in pending:
            task.cancel()


# ---- streaming --------------------------------------------------------------------------------------


@dataclass(slots=True)
class ChoiceDelta:
    """What one choice gained since the last chunk (from a DELTA output), or all of it (a final output)."""

    index: int  # in the response: prompt_index * n + output index
    output: CompletionOutput  # only the new part: its text, token ids and logprobs
    text_offset: int  # characters of the choice's text before output.text

    @property
    def text(self) -> str:
        return self.output.text

    @property
    def finish_reason(self) -> str | None:
        return self.output.finish_reason


@dataclass(slots=True)
class DeltaTracker:
    """Numbers each output's choices as the response does and keeps their text offsets. The engine's outputs are
    the deltas already: text that may begin a stop string is held back there, never taken back."""

    n: int
    _num_chars: dict[int, int] = field(default_factory=dict)  # choice index -> characters sent

    def deltas(self, prompt_index: int, output: RequestOutput) -> list[ChoiceDelta]:
        return [self._delta(prompt_index * self.n + c.index, c) for c in output.outputs]

    def _delta(self, index: int, output: CompletionOutput) -> ChoiceDelta:
        offset = self._num_chars.get(index, 0)
        self._num_chars[index] = offset + len(output.text)
        return ChoiceDelta(index, output, offset)


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"


def sse_error(exc: BaseException) -> str:
    return sse(to_api_error(exc).body())


async def with_error_event(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """Once the 200 header is out, a failure can only be told in-band: an error event, then [DONE]."""
    async with aclosing(chunks):  # closing this closes chunks, which aborts its engine requests
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as exc:  # reported to the client as an error event
            yield sse_error(exc)
    yield SSE_DONE
