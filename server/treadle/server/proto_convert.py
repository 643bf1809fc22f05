"""Protobuf <-> engine dataclasses, at the edge only (nothing past the frontend sees protobuf)."""

from __future__ import annotations

from typing import Any

from treadle.v1 import treadle_pb2 as pb

from ..api.limits import RequestLimits
from ..api.outcome import FinishReason, TokenLogprob, Usage
from ..api.params import RESPONSE_FORMAT_TYPES, ResponseFormat
from ..scheduler.errors import ValidationError
from ..scheduler.events import FinishEvent, TokenEvent
from ..scheduler.generation_request import ChatMessage, GenerationRequest, PluginRequest
from ..scheduler.validation import check_request_id
from ..api.bounded_json import JsonLimitError, loads_bounded

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
    """The chat's messages; more than `limits.max_chat_messages` are refused unconverted."""
    if len(chat.messages) > limits.max_chat_messages:
        raise ValidationError(
            "chat.messages",
            f"at most {limits.max_chat_messages} messages (got {len(chat.messages)})",
        )
    return [ChatMessage(role=m.role, content=m.content) for m in chat.messages]


def request_from_proto(
    msg: pb.GenerateRequest, limits: RequestLimits, deadline: float | None = None
) -> GenerationRequest:
    """The engine's view of a GenerateRequest; `deadline` is seconds left on the call.

    Raises ValidationError for what only the wire format can get wrong (a
    request id over its byte limit, too many chat messages or plugins, plugin
    arguments that are not a bounded JSON object, a response format with none
    of its kinds set); the engine checks the rest.
    """
    if msg.request_id:
        check_request_id(msg.request_id, limits)
    s, t, lp = msg.sampling, msg.stopping, msg.logprobs
    input_kind = msg.WhichOneof("input")
    if len(msg.plugins) > limits.max_plugins:
        raise ValidationError(
            "plugins", f"at most {limits.max_plugins} plugins (got {len(msg.plugins)})"
        )
    return GenerationRequest(
        prompt=msg.prompt if input_kind == "prompt" else None,
        messages=chat_from_proto(msg.chat, limits) if input_kind == "chat" else None,
        prompt_token_ids=list(msg.token_ids.ids) if input_kind == "token_ids" else None,
        max_new_tokens=t.max_new_tokens if t.HasField("max_new_tokens") else None,
        min_new_tokens=t.min_new_tokens,
        ignore_eos=t.ignore_eos,
        stop=list(t.stop),
        stop_token_ids=list(t.stop_token_ids),
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
