"""HTTP errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, and the mapping from
the exceptions the engine raises to them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pydantic import ValidationError

from scaleinfer.engine.scheduler import QueueFullError
from scaleinfer.errors import EngineDeadError, InvalidRequestError
from scaleinfer.server.protocol import ErrorInfo, ErrorResponse

RETRY_AFTER_S = 1
# Request fields an InvalidRequestError message may be about; see _param_of.
_PARAM_NAMES = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "logprobs", "stop",
                "stop_token_ids",
                "n", "prompt", "messages", "presence_penalty", "frequency_penalty", "repetition_penalty",
                "logit_bias", "response_format", "structured_outputs", "guided_json", "guided_regex",
                "guided_choice", "guided_grammar")
# "max_tokens must ...", "prompt token ids must ...", "response_format.json_schema.schema does not compile ..."
_PARAM_MESSAGE = re.compile(r"(\w+)(?:\.[\w.]+)?(?: token ids)? (?:must|is|does not compile) ")


@dataclass(slots=True, eq=False)
class ApiError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status}: {self.message}"

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code))


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def to_api_error(exc: BaseException) -> ApiError:
    """The HTTP answer for any exception a route lets escape; unknown ones are 500s."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return bad_request(str(exc), _param_of(str(exc)))
    if isinstance(exc, QueueFullError):
        return ApiError(503, f"server overloaded, retry later: {exc}", "server_error", code="queue_full",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, EngineDeadError):
        return ApiError(503, str(exc), "server_error", code="engine_dead")
    if isinstance(exc, ValidationError):
        return from_validation_error(exc)
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


def from_validation_error(exc: ValidationError) -> ApiError:
    """A body that parsed as JSON but does not fit the schema: 422 naming the first bad field."""
    first = exc.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return bad_request(f"request body is not valid JSON: {first['msg']}")
    loc = [str(part) for part in first["loc"]]
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    return ApiError(422, f"{where}: {first['msg']}", param=param, code="invalid_type")


def _param_of(message: str) -> str | None:
    """The field a message like "max_tokens must be ..." or "prompt token ids must be ..." is about."""
    match = _PARAM_MESSAGE.match(message)
    return match.group(1) if match and match.group(1) in _PARAM_NAMES else None
