"""The engine's input: one generation request as a client states it.

Plain data; the gRPC frontend converts protobuf messages into this at the
edge. `validation.py` checks it against the model and the server's limits and
turns it into the scheduler's `Request`. The parameters are the SDK's own
`GenerationParams` (declared once, in api/treadle/api/params.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..api.params import ChatMessage, GenerationParams, PluginRequest
from ..api.tools import Tool, ToolChoice

__all__ = ["ChatMessage", "GenerationRequest", "PluginRequest", "Tool", "ToolChoice"]


@dataclass(slots=True)
class GenerationRequest(GenerationParams):
    """Exactly one of `prompt`, `messages`, `prompt_token_ids` gives the input."""

    prompt: str | None = None  # raw text, tokenized as is
    messages: list[ChatMessage] | None = None  # rendered with the model's chat template
    tools: list[Tool] = field(default_factory=list)  # functions the chat offers (messages only)
    tool_choice: ToolChoice | None = None  # None: auto when tools are given
    prompt_token_ids: list[int] | None = None
    request_id: str | None = None  # chosen by the caller, or assigned by the engine
    deadline: float | None = None  # seconds from arrival before the request is cancelled
