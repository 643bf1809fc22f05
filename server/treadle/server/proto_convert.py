"""Protobuf <-> engine dataclasses, at the edge only (nothing past the frontend sees protobuf)."""

from __future__ import annotations

from typing import Any

from treadle.v1 import treadle_pb2 as pb

from ..api.bounded_json import JsonLimitError, loads_bounded
from ..api.checks import ParameterError, check_tools
from ..api.images import ContentPart, ImagePart, TextPart
from ..api.limits import RequestLimits
from ..api.outcome import FinishReason, TokenLogprob, Usage
from ..api.params import RESPONSE_FORMAT_TYPES, ResponseFormat
from ..api.tools import Tool, ToolCall, ToolChoice
from ..scheduler.errors import ValidationError
from ..scheduler.events import FinishEvent, TokenEvent
from ..scheduler.generation_request import ChatMessage, GenerationRequest, PluginRequest
from ..scheduler.validation import check_request_id
from .image_parts import check_image_bytes, check_image_count

# The engine's parameter names that differ from the wire's; the others are the same words.
_WIRE_FIELDS = {
    "max_time": "stopping.max_time_seconds",
    "logprobs": "logprobs.enabled",
    "top_logprobs": "logprobs.top",
    "processed_logprobs": "logprobs.processed",
    "skip_special_tokens": "keep_special_tokens",
}


def wire_field(field: str) -> str:
    """The name a client sees for an engine parameter (`top_logprobs` -> `logprobs.top`)."""
    head, bracket, rest = field.partition("[")  # e.g. logit_bias[5]
    return _WIRE_FIELDS.get(head, head) + bracket + rest


def chat_from_proto(chat: pb.Chat, limits: RequestLimits) -> list[ChatMessage]:
    """The chat's messages. More than `limits.max_chat_messages` messages, or more than
    `limits.max_images` images in all (field `chat`), are refused unconverted, and so is
    an image over `limits.max_image_bytes` (see `check_chat_images`)."""
    if len(chat.messages) > limits.max_chat_messages:
        raise ValidationError(
            "chat.messages",
            f"at most {limits.max_chat_messages} messages (got {len(chat.messages)})",
        )
    check_chat_images(chat, limits)
    return [
        ChatMessage(
            role=m.role,
            content=m.content,
            tool_calls=tuple(call_from_proto(c) for c in m.tool_calls),
            tool_call_id=m.tool_call_id,
            parts=parts_from_proto(m, f"chat.messages[{i}]"),
        )
        for i, m in enumerate(chat.messages)
    ]


def check_chat_images(chat: pb.Chat, limits: RequestLimits) -> None:
    """Refuse a chat with more than `limits.max_images` images (field `chat`), then one
    with an image over `limits.max_image_bytes` (`chat.messages[i].parts[j]`), before
    any part is converted."""
    images = [
        (f"chat.messages[{i}].parts[{j}]", part.image)
        for i, m in enumerate(chat.messages)
        for j, part in enumerate(m.parts)
        if part.HasField("image")
    ]
    check_image_count("chat", len(images), limits)
    for field, image in images:
        check_image_bytes(field, len(image.data), limits)


def parts_from_proto(message: pb.ChatMessage, field: str) -> tuple[ContentPart, ...]:
    """A message's parts (`field` names the message); a part with neither text nor image
    set is refused. (A message with both content and parts is the engine's to refuse.)"""
    return tuple(
        part_from_proto(part, f"{field}.parts[{j}]") for j, part in enumerate(message.parts)
    )


def part_from_proto(part: pb.ContentPart, field: str) -> ContentPart:
    kind = part.WhichOneof("part")
    if kind == "text":
        return TextPart(part.text)
    if kind == "image":  # its size was checked (check_chat_images); the engine decodes it
        return ImagePart(part.image.data, part.image.mime_type)
    raise ValidationError(field, "must set text or image")


def tools_from_proto(chat: pb.Chat, limits: RequestLimits) -> tuple[list[Tool], ToolChoice | None]:
    """The chat's tools and tool choice (None: unset, i.e. auto when there are tools).

    More than `limits.max_tools` tools are refused unconverted; then the counts, sizes,
    names and choice are checked (check_tools), naming `chat.tools[...]` or
    `chat.tool_choice`. Whether each `parameters` is a JSON Schema object is the
    engine's to check.
    """
    if len(chat.tools) > limits.max_tools:
        raise ValidationError(
            "chat.tools", f"at most {limits.max_tools} tools (got {len(chat.tools)})"
        )
    tools = [Tool(t.name, t.description, t.parameters) for t in chat.tools]
    choice = tool_choice_from_proto(chat)
    try:
        check_tools(tools, choice, limits, field="chat.tools")
    except ParameterError as exc:
        raise ValidationError(exc.field, exc.detail) from exc
    return tools, choice


def tool_choice_from_proto(chat: pb.Chat) -> ToolChoice | None:
    """The chat's ToolChoice: its mode's name without `MODE_`, lower case (MODE_FUNCTION
    -> "function"); None when unset or MODE_UNSPECIFIED. A mode this server does not
    know, or a `function` given with another mode, is refused naming chat.tool_choice."""
    wire = chat.tool_choice
    if wire.function and wire.mode != pb.ToolChoice.MODE_FUNCTION:
        raise ValidationError("chat.tool_choice", "function is only for mode MODE_FUNCTION")
    if wire.mode == pb.ToolChoice.MODE_UNSPECIFIED:
        return None
    try:
        mode = pb.ToolChoice.Mode.Name(wire.mode)
    except ValueError:
        raise ValidationError("chat.tool_choice", f"unknown mode {wire.mode}") from None
    return ToolChoice(mode.removeprefix("MODE_").lower(), wire.function)


def call_from_proto(call: pb.ToolCall) -> ToolCall:
    return ToolCall(id=call.id, name=call.name, arguments=call.arguments)


def call_to_proto(call: ToolCall) -> pb.ToolCall:
    return pb.ToolCall(id=call.id, name=call.name, arguments=call.arguments)


def request_from_proto(
    msg: pb.GenerateRequest, limits: RequestLimits, deadline: float | None = None
) -> GenerationRequest:
    """The engine's view of a GenerateRequest; `deadline` is seconds left on the call.

    Raises ValidationError for what only the wire format can get wrong (a
    request id over its byte limit, too many chat messages, images, plugins or
    stop token sequences, an image over its byte limit, a content part with
    neither text nor image, plugin arguments that are not a bounded JSON
    object, a response format with none of its kinds set, tools or a tool
    choice that break check_tools); the engine checks the rest (decoding the
    images among it).
    """
    if msg.request_id:
        check_request_id(msg.request_id, limits)
    s, t, lp = msg.sampling, msg.stopping, msg.logprobs
    input_kind = msg.WhichOneof("input")
    if len(msg.plugins) > limits.max_plugins:
        raise ValidationError(
            "plugins", f"at most {limits.max_plugins} plugins (got {len(msg.plugins)})"
        )
    if len(t.stop_token_sequences) > limits.max_stop_token_sequences:
        raise ValidationError(
            "stop_token_sequences",
            f"at most {limits.max_stop_token_sequences} sequences "
            f"(got {len(t.stop_token_sequences)})",
        )
    is_chat = input_kind == "chat"
    messages = chat_from_proto(msg.chat, limits) if is_chat else None
    tools, tool_choice = tools_from_proto(msg.chat, limits) if is_chat else ([], None)
    return GenerationRequest(
        prompt=msg.prompt if input_kind == "prompt" else None,
        messages=messages,
        tools=tools,
        tool_choice=tool_choice,
        prompt_token_ids=list(msg.token_ids.ids) if input_kind == "token_ids" else None,
        max_new_tokens=t.max_new_tokens if t.HasField("max_new_tokens") else None,
        min_new_tokens=t.min_new_tokens,
        ignore_eos=t.ignore_eos,
        stop=list(t.stop),
        stop_token_ids=list(t.stop_token_ids),
        stop_token_sequences=[list(seq.ids) for seq in t.stop_token_sequences],
        include_stop_in_output=t.include_stop_in_output,
        max_time=t.max_time_seconds if t.HasField("max_time_seconds") else None,
        deadline=deadline,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        min_p=s.min_p,
        typical_p=s.typical_p if s.HasField("typical_p") else 1.0,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        no_repeat_ngram_size=s.no_repeat_ngram_size,
        bad_words=list(s.bad_words),
        bad_words_ids=[list(b.ids) for b in s.bad_words_ids],
        logit_bias=dict(s.logit_bias),
        allowed_token_ids=list(s.allowed_token_ids),
        seed=s.seed if s.HasField("seed") else None,
        logprobs=lp.enabled,
        top_logprobs=lp.top,
        processed_logprobs=lp.processed,
        skip_special_tokens=not msg.keep_special_tokens,
        n=msg.n or 1,
        priority=msg.priority,
        plugins=[_plugin(i, p, limits) for i, p in enumerate(msg.plugins)],
        response_format=response_format_from_proto(msg),
    )


def response_format_from_proto(msg: pb.GenerateRequest) -> ResponseFormat | None:
    """The request's ResponseFormat; None when the field is unset.

    A ResponseFormat message with none of its `format` oneof set (empty, or of a
    kind newer than this server) is refused rather than served unconstrained.
    The oneof's field names are the ResponseFormat types.
    """
    if not msg.HasField("response_format"):
        return None
    wire = msg.response_format
    kind = wire.WhichOneof("format")
    if kind is None:
        raise ValidationError(
            "response_format", f"must set one of {', '.join(RESPONSE_FORMAT_TYPES)}"
        )
    if kind == "choice":
        return ResponseFormat(kind, choices=tuple(wire.choice.choices))
    if kind == "json_object":
        return ResponseFormat(kind)
    return ResponseFormat(kind, value=getattr(wire, kind))  # json_schema, regex, grammar


def _plugin(index: int, plugin: pb.Plugin, limits: RequestLimits) -> PluginRequest:
    args: Any = {}
    if plugin.args_json:
        field = f"plugins[{index}].args_json"
        try:
            args = loads_bounded(
                plugin.args_json, limits.max_plugin_args_bytes, limits.max_plugin_args_depth
            )
        except JsonLimitError as exc:
            raise ValidationError(field, str(exc)) from exc
        if not isinstance(args, dict):
            raise ValidationError(field, "must be a JSON object")
    return PluginRequest(name=plugin.name, args=args)


def logprobs_to_proto(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )


def chunk_to_proto(event: TokenEvent) -> pb.TokenChunk:
    return pb.TokenChunk(
        token_ids=event.token_ids,
        text=event.text,
        logprobs=[logprobs_to_proto(lp) for lp in event.logprobs],
        index=event.index,
    )


def usage_to_proto(usage: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=usage.prompt_tokens,
        cached_prompt_tokens=usage.cached_prompt_tokens,
        generated_tokens=usage.generated_tokens,
        queue_seconds=usage.queue_seconds,
        time_to_first_token_seconds=usage.time_to_first_token_seconds or 0.0,
        total_seconds=usage.total_seconds,
    )


def finish_to_proto(event: FinishEvent, error_code: int) -> pb.Finish:
    """The wire Finish; `error_code` is the status code number reported with an ERROR."""
    finish = pb.Finish(
        reason=pb.FinishReason.Value(event.reason.wire_name),
        stop_sequence=event.stop_sequence or "",
        usage=usage_to_proto(event.usage),
        index=event.index,
        tool_calls=[call_to_proto(c) for c in event.tool_calls],
    )
    if event.message is not None or event.reason is FinishReason.ERROR:
        finish.error.CopyFrom(pb.Error(code=error_code, message=event.message or ""))
    return finish


def refused_finish(code: int, message: str, field: str = "") -> pb.Finish:
    """The Finish of a request refused before it was queued (a Session reports it so)."""
    return pb.Finish(
        reason=pb.FINISH_REASON_ERROR,
        usage=pb.Usage(),
        error=pb.Error(code=code, message=message, field=field),
    )


def rejected(code: int, message: str, field: str = "") -> pb.Rejected:
    """A Session item refused because its request id is already open (the open request goes on)."""
    return pb.Rejected(code=code, message=message, field=field)
