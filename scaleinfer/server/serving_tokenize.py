"""vLLM's POST /tokenize and /detokenize, on the server's tokenizer thread, and GET /version."""

from __future__ import annotations

import importlib.metadata

from scaleinfer.server.errors import bad_request
from scaleinfer.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from scaleinfer.server.serving import ServingContext
from scaleinfer.server.serving_chat import conversation_of, render_chat
from scaleinfer.server.unsupported import refuse_unsupported_chat


async def tokenize(ctx: ServingContext, req: TokenizeRequest) -> TokenizeResponse:
    _check(ctx, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of prompt and messages", "prompt")
    if req.messages is not None:
        tokens = await _tokenize_chat(ctx, req)
    else:
        ctx.limits.check_chars(len(req.prompt or ""), "prompt", "prompt")
        add_special = True if req.add_special_tokens is None else req.add_special_tokens
        tokens = await ctx.tokenizer.encode(req.prompt or "", add_special)
    return TokenizeResponse(count=len(tokens), max_model_len=ctx.engine.max_model_len, tokens=tokens)


async def _tokenize_chat(ctx: ServingContext, req: TokenizeRequest) -> list[int]:
    if req.add_special_tokens:
        raise bad_request("add_special_tokens with messages is not supported: the chat template adds them",
                          "add_special_tokens")
    messages = req.messages or []
    refuse_unsupported_chat(req.model_extra, [m.model_extra for m in messages])
    return await render_chat(ctx, conversation_of(ctx, messages), req.add_generation_prompt)


async def detokenize(ctx: ServingContext, req: DetokenizeRequest) -> DetokenizeResponse:
    _check(ctx, req.model)
    if len(req.tokens) > ctx.limits.max_request_tokens:
        raise bad_request(f"tokens: at most {ctx.limits.max_request_tokens} are accepted, got {len(req.tokens)}",
                          "tokens")
    vocab_size = len(ctx.engine.tokenizer)
    bad = [t for t in req.tokens if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"tokens must be token ids in [0, {vocab_size}), got {bad[:5]}", "tokens")
    return DetokenizeResponse(prompt=await ctx.tokenizer.decode(req.tokens))


def version() -> VersionResponse:
    return VersionResponse(version=importlib.metadata.version("scaleinfer"))


def _check(ctx: ServingContext, model: str | None) -> None:
    if model is not None:
        ctx.check_model(model)
    if not ctx.tokenizer.has_tokenizer:
        raise bad_request("this engine was started without a tokenizer (skip_tokenizer_init)")
