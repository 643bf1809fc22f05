"""The one place where refusals become HTTP statuses in OpenAI's error shape.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "n", "code": null}}

A treadle error is first given its gRPC status code (`status_codes.status_of`, shared with
the gRPC frontend, so both count it under the same code in the metrics), then the HTTP
status of the same meaning. A field is named as OpenAI names it (`max_tokens`, not the
engine's `max_new_tokens`). Anything unexpected is a 500 with a generic message and an
error id; the details go to the server log only.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import grpc
import pydantic

from ...api.bounded_json import JsonLimitError
from ...scheduler.errors import TreadleError, ValidationError, log_internal_error
from ..status_codes import RETRY_DELAY_S, status_of

log = logging.getLogger("treadle.http")

# gRPC code -> (HTTP status, OpenAI error type)
_HTTP: Mapping[grpc.StatusCode, tuple[int, str]] = MappingProxyType(
    {
        grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
        grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
        grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
        grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
        grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
        grpc.StatusCode.CANCELLED: (499, "cancelled"),
        grpc.StatusCode.INTERNAL: (500, "server_error"),
        grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
        grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    }
)

# The engine's names of fields that OpenAI's endpoints name otherwise.
CHAT_PARAMS: Mapping[str, str] = MappingProxyType(
    {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}
)
COMPLETION_PARAMS: Mapping[str, str] = MappingProxyType(
    {**CHAT_PARAMS, "prompt_token_ids": "prompt", "top_logprobs": "logprobs"}
)

# pydantic's names of union members in an error's location (not fields): "str", "list[int]"
_FIELD = re.compile(r"[a-z_][a-z0-9_]*")
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


@dataclass
class ApiError(Exception):
    """A refusal, ready to send: its gRPC code (for the metrics) and OpenAI's shape."""

    code: grpc.StatusCode
    message: str
    param: str | None = None
    error_code: str | None = None  # OpenAI's `code` (e.g. "model_not_found")
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)
        delay = RETRY_DELAY_S.get(self.code)
        if delay is not None:
            self.headers.setdefault("Retry-After", str(max(1, math.ceil(delay))))

    @property
    def status(self) -> int:
        return _HTTP.get(self.code, (500, ""))[0]

    def body(self) -> dict[str, Any]:
        kind = _HTTP.get(self.code, (500, "server_error"))[1]
        return {
            "error": {
                "message": self.message,
                "type": kind,
                "param": self.param,
                "code": self.error_code,
            }
        }


def api_error(exc: BaseException, params: Mapping[str, str] = CHAT_PARAMS) -> ApiError:
    """The ApiError of anything a request handler raised; `params` renames engine fields."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, pydantic.ValidationError):
        return _invalid_body(exc)
    if isinstance(exc, JsonLimitError):
        return ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"the request body {exc}")
    if isinstance(exc, ValidationError):
        param = openai_param(exc.field, params)
        return ApiError(
            grpc.StatusCode.INVALID_ARGUMENT, param + str(exc).removeprefix(exc.field), param
        )
    if isinstance(exc, TreadleError):
        return ApiError(status_of(exc), str(exc))
    message = log_internal_error(log, "an HTTP request failed", exc_info=exc)
    return ApiError(grpc.StatusCode.INTERNAL, message)


def openai_param(field_name: str, params: Mapping[str, str]) -> str:
    """OpenAI's name of an engine field (`max_new_tokens` -> `max_tokens`, `stop[2]` kept;
    the chat's wire names: `chat.messages[2].parts[1]` -> `messages[2].content[1]`,
    `chat.tools[0].name` -> `tools[0].name`, `chat` -> `messages`)."""
    for engine, openai in _CHAT_NAMES:
        if field_name.startswith(engine):
            field_name = openai + field_name.removeprefix(engine)
            break
    field_name = field_name.replace(".parts[", ".content[")
    head, bracket, rest = field_name.partition("[")
    return params.get(head, head) + bracket + rest


# The gRPC chat's field names, as the engine reports them, and OpenAI's (first match wins).
_CHAT_NAMES = (("chat.messages", "messages"), ("chat.", ""), ("chat", "messages"))


def unauthenticated() -> ApiError:
    return ApiError(
        grpc.StatusCode.UNAUTHENTICATED,
        "a valid bearer token is required (Authorization: Bearer <token>)",
        error_code="invalid_api_key",
    )


def unknown_model(name: str, served: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.NOT_FOUND,
        f"the model {name[:64]!r} does not exist; this server serves {served!r}",
        "model",
        "model_not_found",
    )


def body_too_large(limit: int) -> ApiError:
    return ApiError(
        grpc.StatusCode.INVALID_ARGUMENT, f"the request body is over {limit} bytes, its limit"
    )


def _invalid_body(exc: pydantic.ValidationError) -> ApiError:
    """A 400 naming the first field pydantic refused (`messages[0].content`)."""
    first = exc.errors(include_url=False, include_input=False)[0]
    param = _param_of(first["loc"])
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "is not a field treadle accepts (docs/openai.md lists the fields)"
    return ApiError(
        grpc.StatusCode.INVALID_ARGUMENT, f"{param}: {message}" if param else message, param
    )


def _param_of(loc: tuple[int | str, ...]) -> str | None:
    """`("messages", 0, "content", "str")` -> `messages[0].content` (union tags dropped)."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _FIELD.fullmatch(part) and part not in _TYPE_NAMES:
            text += f".{part}" if text else part
    return text or None
