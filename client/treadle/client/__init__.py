"""treadle's Python SDK: `Client` (blocking) and `AsyncClient` (asyncio).

from treadle.client import Client
with Client("localhost:50051") as client:
    print(client.generate("Hello", max_new_tokens=16).text)
"""

from ..api.images import ImagePart, TextPart
from ..api.limits import RequestLimits
from ..api.outcome import FinishReason, Usage
from ..api.params import ChatMessage, GenerationParams, PluginRequest, ResponseFormat
from ..api.tools import Tool, ToolCall, ToolChoice
from .async_client import AsyncClient
from .connection import TlsConfig
from .errors import (
    Cancelled,
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    Overloaded,
    RequestTooLarge,
    TreadleClientError,
    Unauthenticated,
    Unavailable,
)
from .formats import choice, grammar, json_object, json_schema, regex
from .images import image
from .results import Event, Finish, ModelInfo, Result, SampleResult, TokenChunk
from .retry import RetryPolicy
from .sync_client import Client
from .tools import call_arguments, tool

__all__ = [
    "AsyncClient",
    "Cancelled",
    "ChatMessage",
    "Client",
    "DeadlineExceeded",
    "Event",
    "Finish",
    "FinishReason",
    "GenerationParams",
    "ImagePart",
    "InternalError",
    "InvalidArgument",
    "ModelInfo",
    "Overloaded",
    "PluginRequest",
    "RequestLimits",
    "RequestTooLarge",
    "ResponseFormat",
    "Result",
    "RetryPolicy",
    "SampleResult",
    "TextPart",
    "TlsConfig",
    "TokenChunk",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "TreadleClientError",
    "Unauthenticated",
    "Unavailable",
    "Usage",
    "call_arguments",
    "choice",
    "grammar",
    "image",
    "json_object",
    "json_schema",
    "regex",
    "tool",
]
