"""ASGI middleware: a request body limit enforced before any route parses the body."""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scaleinfer.server.errors import ApiError

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


class BodySizeLimitMiddleware:
    """Answers 413 to a body over max_body_bytes, declared (Content-Length) or streamed (chunked).

    The body is read here, up to the limit, and replayed to the app; later receive() calls (the
    disconnect notice) pass straight through.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        body = None if declared is not None and declared > self.max_body_bytes else await self._read(receive)
        if body is None:
            await _too_large(self.max_body_bytes, declared)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)  # disconnected; the app will see it on its next receive
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _too_large(limit: int, declared: int | None) -> Response:
    size = f"{declared} bytes" if declared is not None else "more"
    error = ApiError(413, f"request body is {size}, over the limit of {limit} bytes", code="request_too_large")
    return Response(error.body().model_dump_json(), status_code=413, media_type="application/json",
                    headers={"Connection": "close"})


def _replay(body: bytes, receive: Receive) -> Receive:
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
