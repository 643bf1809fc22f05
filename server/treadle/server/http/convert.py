"""Request bodies -> the engine's `GenerationRequest`s (runs off the event loop).

The body is parsed as bounded JSON (its size and nesting are checked before it is parsed),
validated by the pydantic models of protocol.py, then converted; what only this edge can
get wrong raises `ValidationError` naming OpenAI's field, and the engine checks the rest
when the request is queued. A completion with a list of prompts is one engine request per
prompt (each with the body's `n` samples).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ...api.bounded_json import JsonLimitError, loads_bounded
from ...api.images import ContentPart, TextPart
from ...api.limits import RequestLimits
from ...api.params import ResponseFormat
from ...api.tools import Tool, ToolCall, ToolChoice
from ...scheduler.errors import ValidationError
from ...scheduler.generation_request import ChatMessage, GenerationRequest, PluginRequest
from .images import check_images, content_parts
from .protocol import (
    ChatCompletionRequest,
    CommonRequest,
    CompletionRequest,
    Message,
    NamedToolChoice,
    ResponseFormatBody,
    ToolBody,
)
from .protocol import ContentPart as ContentPartBody

MAX_BODY_DEPTH = 64  # nesting of a request body's arrays and objects (schemas included)
OPENAI_TEMPERATURE = 1.0  # OpenAI's default: a body without `temperature` samples


@dataclass(frozen=True)
class ChatCall:
    body: ChatCompletionRequest
    gen: GenerationRequest


@dataclass(frozen=True)
class CompletionCall:
    body: CompletionRequest
    gens: list[GenerationRequest]  # one per prompt


def parse_json(raw: bytes, max_bytes: int) -> Any:
    """The body as JSON; JsonLimitError when it is not UTF-8 JSON within the limits."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonLimitError("is not UTF-8") from exc
    return loads_bounded(text, max_bytes, MAX_BODY_DEPTH)


def chat_call(raw: bytes, limits: RequestLimits, max_bytes: int) -> ChatCall:
    """Parse and convert a /v1/chat/completions body (raises pydantic's ValidationError,
    JsonLimitError or ValidationError)."""
    body = ChatCompletionRequest.model_validate(parse_json(raw, max_bytes))
    if len(body.messages) > limits.max_chat_messages:
        raise ValidationError(
            "messages", f"at most {limits.max_chat_messages} messages (got {len(body.messages)})"
        )
    if body.top_logprobs and not body.logprobs:
        raise ValidationError("top_logprobs", "needs logprobs set to true")
    check_images(body.messages, limits)
    common = _common(body, limits)
    if body.max_completion_tokens is not None:  # the newer name wins
        common["max_new_tokens"] = body.max_completion_tokens
    gen = GenerationRequest(
        messages=[_message(i, m, limits) for i, m in enumerate(body.messages)],
        tools=[_tool(t) for t in body.tools or ()],
        tool_choice=_tool_choice(body.tool_choice),
        logprobs=body.logprobs,
        top_logprobs=body.top_logprobs or 0,
        response_format=_response_format(body.response_format),
        **common,
    )
    return ChatCall(body, gen)


def completion_call(raw: bytes, limits: RequestLimits, max_bytes: int) -> CompletionCall:
    """Parse and convert a /v1/completions body (raises as `chat_call` does)."""
    body = CompletionRequest.model_validate(parse_json(raw, max_bytes))
    if body.echo:
        raise ValidationError("echo", "is not supported (leave it false)")
    if body.suffix is not None:
        raise ValidationError("suffix", "is not supported")
    if body.best_of is not None and body.best_of != body.n:
        raise ValidationError("best_of", "is not supported unless it equals n")
    prompts = _prompts(body.prompt, limits)
    common = _common(body, limits)
    common["logprobs"] = body.logprobs is not None
    common["top_logprobs"] = body.logprobs or 0
    gens = [GenerationRequest(**prompt, **common) for prompt in prompts]
    return CompletionCall(body, gens)


def _common(body: CommonRequest, limits: RequestLimits) -> dict[str, Any]:
    """The GenerationRequest fields both endpoints set the same way."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
    return {
        "max_new_tokens": body.max_tokens,
        "min_new_tokens": body.min_tokens,
        "ignore_eos": body.ignore_eos,
        "stop": stop,
        "stop_token_ids": list(body.stop_token_ids or ()),
        "stop_token_sequences": [list(seq) for seq in body.stop_token_sequences or ()],
        "temperature": OPENAI_TEMPERATURE if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "repetition_penalty": body.repetition_penalty,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "logit_bias": _logit_bias(body.logit_bias, limits),
        "seed": body.seed,
        "n": body.n,
        "priority": body.priority,
        "plugins": _plugins(body, limits),
    }


def _message(index: int, m: Message, limits: RequestLimits) -> ChatMessage:
    role = "system" if m.role == "developer" else m.role
    calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or ())
    content, parts = _content(index, m.content, limits)
    return ChatMessage(
        role=role,
        content=content,
        tool_calls=calls,
        tool_call_id=m.tool_call_id or "",
        parts=parts,
    )


def _content(
    index: int, content: str | list[ContentPartBody] | None, limits: RequestLimits
) -> tuple[str, tuple[ContentPart, ...]]:
    """A message's (content, parts): its string, or its content list's parts; a list of
    text parts only is joined into one string (as a text-only chat template expects)."""
    if content is None or isinstance(content, str):
        return content or "", ()
    parts = content_parts(index, content, limits)
    texts = [p.text for p in parts if isinstance(p, TextPart)]
    return ("".join(texts), ()) if len(texts) == len(parts) else ("", parts)


def _tool(tool: ToolBody) -> Tool:
    f = tool.function
    parameters = "" if f.parameters is None else json.dumps(f.parameters)
    return Tool(name=f.name, description=f.description, parameters=parameters)


def _tool_choice(choice: str | NamedToolChoice | None) -> ToolChoice | None:
    if choice is None:
        return None
    if isinstance(choice, NamedToolChoice):
        return ToolChoice("function", choice.function.name)
    return ToolChoice(choice)


def _response_format(fmt: ResponseFormatBody | None) -> ResponseFormat | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat("json_object")
    if fmt.json_schema is None:
        raise ValidationError("response_format.json_schema", "is required for type json_schema")
    return ResponseFormat("json_schema", value=json.dumps(fmt.json_schema.schema_))


def _logit_bias(bias: dict[str, float] | None, limits: RequestLimits) -> dict[int, float]:
    if not bias:
        return {}
    if len(bias) > limits.max_logit_bias:
        raise ValidationError(
            "logit_bias", f"at most {limits.max_logit_bias} entries (got {len(bias)})"
        )
    try:
        return {int(token): value for token, value in bias.items()}
    except ValueError as exc:
        raise ValidationError("logit_bias", "keys must be token ids (integers as text)") from exc


def _plugins(body: CommonRequest, limits: RequestLimits) -> list[PluginRequest]:
    plugins = body.plugins or []
    if len(plugins) > limits.max_plugins:
        raise ValidationError(
            "plugins", f"at most {limits.max_plugins} plugins (got {len(plugins)})"
        )
    return [PluginRequest(name=p.name, args=p.args) for p in plugins]


def _prompts(prompt: str | list[Any], limits: RequestLimits) -> list[dict[str, Any]]:
    """The input of each engine request: a text, or token ids; a batch has at most
    `limits.max_samples` prompts (each prompt's samples run at once)."""
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if not prompt:
        raise ValidationError("prompt", "is empty")
    if all(isinstance(p, int) for p in prompt):
        return [{"prompt_token_ids": list(prompt)}]
    if len(prompt) > limits.max_samples:
        raise ValidationError(
            "prompt", f"at most {limits.max_samples} prompts in a batch (got {len(prompt)})"
        )
    return [{"prompt": p} if isinstance(p, str) else {"prompt_token_ids": list(p)} for p in prompt]
