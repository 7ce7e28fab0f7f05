"""The FastAPI app: routes, auth, error mapping, and run_server, the entry `scaleinfer serve` calls.

Bodies are parsed here rather than by FastAPI so each failure gets its own status: invalid UTF-8 or JSON
400, a schema mismatch 422 naming the field; every error is in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from scaleinfer.config import EngineConfig, torchrun_env
from scaleinfer.engine.async_embedder import AsyncEmbedder
from scaleinfer.engine.async_engine import AsyncLLMEngine
from scaleinfer.engine.core import EngineCore
from scaleinfer.engine.scheduler import QueueFullError
from scaleinfer.errors import EngineDeadError, InvalidRequestError, ScaleInferError
from scaleinfer.heap import frozen_heap
from scaleinfer.server.errors import ApiError, bad_request, from_validation_error, to_api_error
from scaleinfer.server.middleware import DEFAULT_MAX_BODY_BYTES, BodySizeLimitMiddleware
from scaleinfer.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    VersionResponse,
)
from scaleinfer.server.serving import ServingContext
from scaleinfer.server.serving_chat import create_chat_completion
from scaleinfer.server.serving_completion import create_completion
from scaleinfer.server.serving_embedding import create_embedding
from scaleinfer.server.serving_tokenize import detokenize, tokenize, version

# Answered in the ExceptionMiddleware; `Exception` (a 500) goes to the ServerErrorMiddleware, which logs it.
_HANDLED = (ApiError, InvalidRequestError, QueueFullError, EngineDeadError, StarletteHTTPException, Exception)
DEFAULT_SHUTDOWN_TIMEOUT_S = 10.0  # in-flight requests get this long to finish after SIGTERM / SIGINT
T = TypeVar("T")
RequestModel = TypeVar("RequestModel", bound=BaseModel)
TASKS = ("generate", "embed")


def build_app(engine: AsyncLLMEngine | AsyncEmbedder, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_n: int = 16,
              served_model_name: str | None = None, tool_call_parser: str | None = None,
              enable_auto_tool_choice: bool = False) -> FastAPI:
    """An app serving `engine` under served_model_name (default: the engine's model name); with api_key set,
    every /v1 route, /tokenize and /detokenize need `Authorization: Bearer <api_key>`. An AsyncEmbedder
    serves /v1/embeddings, an AsyncLLMEngine the completions routes; each refuses the other's with a 400.
    tool_call_parser: the tool-call format (default: the chat template's; see tool_parsers)."""
    app = FastAPI(title="scaleinfer", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ServingContext.create(engine, max_n, served_model_name, tool_call_parser, enable_auto_tool_choice)
    app.state.api_key = api_key
    app.include_router(_public)
    app.include_router(_authed)
    app.include_router(_v1)
    for exc_type in _HANDLED:
        app.add_exception_handler(exc_type, _error_response)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=max_body_bytes)
    return app


def run_server(config: EngineConfig, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, log_level: str = "info",
               shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S, served_model_name: str | None = None,
               task: str = "generate", tool_call_parser: str | None = None,
               enable_auto_tool_choice: bool = False, core_class: type | None = None) -> None:
    """Bind host:port (a port in use fails here, before any loading), load the engine (task "generate": a
    decoder whose core runs in a process of its own, core_class: EngineCore or a subclass; "embed": an encoder)
    and serve until SIGTERM or SIGINT; then drain for up to shutdown_timeout_s, abort what is left, stop the
    engine and return (see server/graceful.py). Raises the engine's EngineDeadError when it died while serving."""
    import uvicorn

    from scaleinfer.server.graceful import GracefulServer

    if task not in TASKS:
        raise InvalidRequestError(f"task must be one of {TASKS}, got {task!r}")
    launched = torchrun_env()
    if launched is not None and launched.rank != 0 and task == "generate":
        EngineCore(config, progress=False)  # a worker rank: serves steps until rank 0 shuts down, then exits
        return
    sock = _listen(host, port)
    try:
        engine = (AsyncEmbedder.from_config(config) if task == "embed"
                  else AsyncLLMEngine.from_config(config, core_class))
    except BaseException:
        sock.close()
        raise
    try:
        app = build_app(engine, api_key, max_body_bytes, served_model_name=served_model_name,
                        tool_call_parser=tool_call_parser, enable_auto_tool_choice=enable_auto_tool_choice)
    except BaseException:
        sock.close()
        engine.shutdown(reason="server did not start")
        raise
    try:
        uvicorn_config = uvicorn.Config(app, host=host, port=port, log_level=log_level)
        server = GracefulServer(uvicorn_config, engine, shutdown_timeout_s)
        print(f"scaleinfer: serving {app.state.ctx.model_name!r} at http://{host}:{port}/v1 "
              f"({'an API key is required' if api_key else 'no API key required'})", flush=True)
        if task != "embed" and not getattr(engine.tokenizer, "chat_template", None):
            print("scaleinfer: the model has no chat template: /v1/chat/completions answers 400 "
                  "(start with --chat-template to serve chat)", flush=True)
        with frozen_heap():  # tokenizer, app and libraries: no full collection walks them between chunks
            server.run(sockets=[sock])
        if server.engine_failure is not None:
            raise server.engine_failure
    finally:
        sock.close()
        app.state.ctx.tokenizer.close()
        engine.shutdown(reason="server is shutting down")


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound now: a port in use is an error in a second, not after the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ScaleInferError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    return sock


# ---- auth and errors --------------------------------------------------------------------------------


async def _check_api_key(request: Request) -> None:
    expected: str | None = request.app.state.api_key
    if expected is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise ApiError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


async def _error_response(request: Request, exc: Exception) -> Response:
    if isinstance(exc, StarletteHTTPException):
        exc = ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
    error = to_api_error(exc)
    _ctx(request).metrics.errors.labels(str(error.status)).inc()
    return JSONResponse(error.body().model_dump(), status_code=error.status, headers=error.headers)


def _ctx(request: Request) -> ServingContext:
    return request.app.state.ctx


# ---- routes -----------------------------------------------------------------------------------------

_public = APIRouter()
_authed = APIRouter(dependencies=[Depends(_check_api_key)])  # vLLM's paths outside /v1 that do work
_v1 = APIRouter(prefix="/v1", dependencies=[Depends(_check_api_key)])


@_public.get("/health")
async def health(request: Request) -> Response:
    engine = _ctx(request).engine
    if engine.is_healthy:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "unhealthy", "error": str(engine.dead_error)}, status_code=503)


@_public.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_ctx(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@_public.get("/version")
async def version_route() -> VersionResponse:
    return version()


@_authed.post("/tokenize")
async def tokenize_route(request: Request) -> Response:
    return await _serve(request, TokenizeRequest, tokenize)


@_authed.post("/detokenize")
async def detokenize_route(request: Request) -> Response:
    return await _serve(request, DetokenizeRequest, detokenize)


@_v1.get("/models")
async def models(request: Request) -> ModelList:
    ctx = _ctx(request)
    return ModelList(data=[ModelCard(id=ctx.model_name, max_model_len=ctx.engine.max_model_len)])


@_v1.post("/completions")
async def completions(request: Request) -> Response:
    _ctx(request).require_task("generate", "/v1/completions")
    return await _serve(request, CompletionRequest, create_completion)


@_v1.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    _ctx(request).require_task("generate", "/v1/chat/completions")
    return await _serve(request, ChatCompletionRequest, create_chat_completion)


@_v1.post("/embeddings")
async def embeddings(request: Request) -> Response:
    _ctx(request).require_task("embed", "/v1/embeddings")
    return await _serve(request, EmbeddingRequest, create_embedding)


async def _serve(request: Request, schema: type[RequestModel],
                 handler: Callable[[ServingContext, RequestModel], Awaitable[Any]]) -> Response:
    """Parse, run the handler until it answers or the client leaves, and frame its answer."""
    body = await request.body()
    try:
        req = schema.model_validate_json(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise bad_request(f"request body is not valid UTF-8: {exc}") from exc
    except ValidationError as exc:
        raise from_validation_error(exc) from exc
    result = await _until_disconnect(request, handler(_ctx(request), req))
    if result is None:
        return Response(status_code=499)  # nobody is listening
    if isinstance(result, BaseModel):
        return Response(result.model_dump_json(), media_type="application/json")
    return _EventStream(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """work's result, or None once the client disconnected (work is then cancelled: its requests abort)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()  # a no-op once it is done
    with contextlib.suppress(asyncio.CancelledError):
        return await task
    return None


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """SSE response that always closes its body iterator, which aborts the engine requests behind it.

    Starlette cancels the sending task when the client disconnects; if that lands while the iterator
    sits at a yield, nothing else would close it before garbage collection.
    """

    body_iterator: AsyncIterator[str]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
