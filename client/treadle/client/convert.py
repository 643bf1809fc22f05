"""SDK types <-> protobuf messages."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from treadle.v1 import treadle_pb2 as pb

from ..api.checks import ParameterError
from ..api.images import ContentPart, TextPart
from ..api.limits import RequestLimits
from ..api.params import ChatMessage, GenerationParams, ResponseFormat
from ..api.tools import Tool, ToolCall, ToolChoice
from .images import as_parts
from .results import (
    Finish,
    FinishReason,
    ModelInfo,
    Result,
    SampleResult,
    TokenChunk,
    TokenLogprob,
    Usage,
)
from .tools import as_call

Message = ChatMessage | Mapping[str, Any]  # a ChatMessage, or an OpenAI-style dict
Prompt = str | Sequence[Message]  # text, or chat messages

_DEFAULT_LIMITS = RequestLimits()  # what ModelInfo means where an older server sends 0


def chat_to_proto(
    messages: Sequence[Message], tools: Sequence[Tool] = (), tool_choice: ToolChoice | None = None
) -> pb.Chat:
    """The wire Chat: the messages (see `chat_message`), the tools and the tool choice."""
    chat = pb.Chat(
        messages=[message_to_proto(m) for m in chat_messages(messages)],
        tools=[
            pb.Tool(name=t.name, description=t.description, parameters=t.parameters) for t in tools
        ],
    )
    if tool_choice is not None:
        chat.tool_choice.CopyFrom(tool_choice_to_proto(tool_choice))
    return chat


def chat_messages(messages: Sequence[Message]) -> list[ChatMessage]:
    """Every message as a ChatMessage (see `chat_message`)."""
    return [chat_message(m, i) for i, m in enumerate(messages)]


def chat_message(m: Message, index: int) -> ChatMessage:
    """A ChatMessage from a ChatMessage or a dict with "role" and "content" (None or absent:
    empty, as in an assistant message that only calls tools; a list: text and image
    parts, see `treadle.client.images`), and optionally "tool_calls" (each a ToolCall or
    a dict, see tools.as_call) and "tool_call_id". Raises ParameterError naming
    `chat.messages[index]...` for a malformed one."""
    if isinstance(m, ChatMessage):
        return m
    field = f"chat.messages[{index}]"
    role, content, call_id = m.get("role"), m.get("content") or "", m.get("tool_call_id") or ""
    if not isinstance(role, str) or not isinstance(call_id, str):
        raise ParameterError(field, "role and tool_call_id must be strings")
    calls = m.get("tool_calls") or ()
    if isinstance(calls, str | Mapping):
        raise ParameterError(f"{field}.tool_calls", "must be a list of calls")
    text, parts = content_of(content, field)
    return ChatMessage(
        role,
        text,
        tool_calls=tuple(as_call(c, f"{field}.tool_calls[{j}]") for j, c in enumerate(calls)),
        tool_call_id=call_id,
        parts=parts,
    )


def content_of(content: Any, field: str) -> tuple[str, tuple[ContentPart, ...]]:
    """A message's (content, parts): a string, or a list of parts (a list of text parts
    only is joined into one string, which every server and chat template takes)."""
    if isinstance(content, str):
        return content, ()
    if not isinstance(content, Sequence):
        raise ParameterError(f"{field}.content", "must be a string or a list of parts")
    parts = as_parts(content, field)
    texts = [p.text for p in parts if isinstance(p, TextPart)]
    return ("".join(texts), ()) if len(texts) == len(parts) else ("", parts)


def message_to_proto(m: ChatMessage) -> pb.ChatMessage:
    return pb.ChatMessage(
        role=m.role,
        content=m.content,
        tool_calls=[call_to_proto(c) for c in m.tool_calls],
        tool_call_id=m.tool_call_id,
        parts=[part_to_proto(p) for p in m.parts],
    )


def part_to_proto(part: ContentPart) -> pb.ContentPart:
    if isinstance(part, TextPart):
        return pb.ContentPart(text=part.text)
    return pb.ContentPart(image=pb.Image(data=part.data, mime_type=part.mime_type))


def call_to_proto(call: ToolCall) -> pb.ToolCall:
    return pb.ToolCall(id=call.id, name=call.name, arguments=call.arguments)


def call_from_proto(call: pb.ToolCall) -> ToolCall:
    return ToolCall(id=call.id, name=call.name, arguments=call.arguments)


def tool_choice_to_proto(choice: ToolChoice) -> pb.ToolChoice:
    """The wire ToolChoice: mode MODE_ + the type in capitals (function -> MODE_FUNCTION)."""
    try:
        mode = pb.ToolChoice.Mode.Value("MODE_" + choice.type.upper())
    except ValueError:
        raise ValueError(f"tool_choice: unknown type {choice.type!r}") from None
    return pb.ToolChoice(mode=mode, function=choice.name)


def request_to_proto(
    prompt: Prompt | None,
    token_ids: Sequence[int] | None,
    params: GenerationParams,
    request_id: str = "",
    *,
    tools: Sequence[Tool] = (),
    tool_choice: ToolChoice | None = None,
) -> pb.GenerateRequest:
    """The wire request for one input (text, chat messages or token ids) and its parameters;
    `tools` and `tool_choice` go into the chat (they are for chat input only)."""
    p = params
    msg = pb.GenerateRequest(
        request_id=request_id,
        sampling=pb.SamplingParameters(
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            min_p=p.min_p,
            typical_p=p.typical_p,
            repetition_penalty=p.repetition_penalty,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            no_repeat_ngram_size=p.no_repeat_ngram_size,
            bad_words=p.bad_words,
            bad_words_ids=[pb.TokenIds(ids=ids) for ids in p.bad_words_ids],
            logit_bias=p.logit_bias,
            allowed_token_ids=p.allowed_token_ids,
            seed=p.seed,
        ),
        stopping=pb.StoppingParameters(
            max_new_tokens=p.max_new_tokens,
            min_new_tokens=p.min_new_tokens,
            ignore_eos=p.ignore_eos,
            stop=p.stop,
            stop_token_ids=p.stop_token_ids,
            stop_token_sequences=[pb.TokenIds(ids=ids) for ids in p.stop_token_sequences],
            include_stop_in_output=p.include_stop_in_output,
            max_time_seconds=p.max_time,
        ),
        logprobs=pb.LogprobsOptions(
            enabled=p.logprobs, top=p.top_logprobs, processed=p.processed_logprobs
        ),
        priority=p.priority,
        plugins=[pb.Plugin(name=x.name, args_json=json.dumps(x.args)) for x in p.plugins],
        keep_special_tokens=not p.skip_special_tokens,
        n=p.n,
    )
    if p.response_format is not None:
        msg.response_format.CopyFrom(response_format_to_proto(p.response_format))
    if (tools or tool_choice is not None) and (prompt is None or isinstance(prompt, str)):
        field = "chat.tools" if tools else "chat.tool_choice"
        raise ParameterError(field, "is for a chat input (a list of messages) only")
    if token_ids is not None:
        msg.token_ids.CopyFrom(pb.TokenIds(ids=token_ids))
    elif isinstance(prompt, str):
        msg.prompt = prompt
    elif prompt is not None:
        msg.chat.CopyFrom(chat_to_proto(prompt, tools, tool_choice))
    return msg


def response_format_to_proto(f: ResponseFormat) -> pb.ResponseFormat:
    """The wire ResponseFormat: its oneof field is named by `f.type`."""
    if f.type == "choice":
        return pb.ResponseFormat(choice=pb.ResponseFormat.Choice(choices=f.choices))
    if f.type == "json_object":
        return pb.ResponseFormat(json_object=pb.ResponseFormat.JsonObject())
    if f.type == "json_schema":
        return pb.ResponseFormat(json_schema=f.value)
    if f.type == "regex":
        return pb.ResponseFormat(regex=f.value)
    if f.type == "grammar":
        return pb.ResponseFormat(grammar=f.value)
    raise ValueError(f"response_format: unknown type {f.type!r}")


def logprob_from_proto(lp: pb.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(lp.token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top))


def chunk_from_proto(request_id: str, chunk: pb.TokenChunk) -> TokenChunk:
    return TokenChunk(
        request_id=request_id,
        token_ids=tuple(chunk.token_ids),
        text=chunk.text,
        logprobs=tuple(logprob_from_proto(lp) for lp in chunk.logprobs),
        index=chunk.index,
    )


def finish_reason_from_proto(wire: int) -> FinishReason:
    """The wire's finish reason; one this SDK does not know (a newer server's) is ERROR."""
    try:
        return FinishReason.from_wire_name(pb.FinishReason.Name(wire))
    except (KeyError, ValueError):
        return FinishReason.ERROR


def finish_from_proto(request_id: str, finish: pb.Finish) -> Finish:
    u = finish.usage
    return Finish(
        request_id=request_id,
        reason=finish_reason_from_proto(finish.reason),
        usage=Usage(
            prompt_tokens=u.prompt_tokens,
            cached_prompt_tokens=u.cached_prompt_tokens,
            generated_tokens=u.generated_tokens,
            queue_seconds=u.queue_seconds,
            time_to_first_token_seconds=u.time_to_first_token_seconds,
            total_seconds=u.total_seconds,
        ),
        stop_sequence=finish.stop_sequence,
        error_code=finish.error.code,
        error_message=finish.error.message,
        index=finish.index,
        tool_calls=tuple(call_from_proto(c) for c in finish.tool_calls),
    )


def event_from_proto(event: pb.GenerateEvent | pb.SessionEvent) -> TokenChunk | Finish:
    if event.HasField("token"):
        return chunk_from_proto(event.request_id, event.token)
    return finish_from_proto(event.request_id, event.finish)


def result_from_proto(response: pb.GenerateResponse) -> Result:
    """The Result of a GenerateResponse: its `samples` when n > 1, else the one sample
    its top-level fields hold."""
    rid = response.request_id
    if response.samples:
        return Result.of(rid, [sample_from_proto(rid, s) for s in response.samples])
    return Result.of(rid, [sample_from_proto(rid, response)])


def sample_from_proto(request_id: str, sample: pb.Sample | pb.GenerateResponse) -> SampleResult:
    """One sample's result (a GenerateResponse's top-level fields are sample 0's)."""
    return SampleResult(
        index=sample.index if isinstance(sample, pb.Sample) else 0,
        text=sample.text,
        token_ids=tuple(sample.token_ids),
        finish=finish_from_proto(request_id, sample.finish),
        logprobs=tuple(logprob_from_proto(lp) for lp in sample.logprobs),
    )


def model_info_from_proto(info: pb.ModelInfoResponse) -> ModelInfo:
    return ModelInfo(
        model=info.model,
        context_length=info.context_length,
        max_total_tokens=info.max_total_tokens,
        vocab_size=info.vocab_size,
        eos_token_ids=tuple(info.eos_token_ids),
        max_batch_rows=info.max_batch_rows,
        kv_cache_tokens=info.kv_cache_tokens,
        default_max_new_tokens=info.default_max_new_tokens,
        max_stop_strings=info.max_stop_strings,
        max_plugins=info.max_plugins,
        max_top_logprobs=info.max_top_logprobs,
        max_waiting=info.max_waiting,
        max_request_bytes=info.max_request_bytes,
        plugins=tuple(info.plugins),
        has_chat_template=info.has_chat_template,
        max_samples=info.max_samples or 1,  # 0: a server that predates samples
        # 0 and (): a server that predates structured output (it accepts no format)
        max_response_format_bytes=info.max_response_format_bytes
        or _DEFAULT_LIMITS.max_response_format_bytes,
        max_response_format_choices=info.max_response_format_choices
        or _DEFAULT_LIMITS.max_response_format_choices,
        response_format_compile_seconds=info.response_format_compile_seconds
        or _DEFAULT_LIMITS.response_format_compile_seconds,
        response_format_types=tuple(info.response_format_types),
        # 0: a server that predates tool calling (it would ignore the tools)
        max_tools=info.max_tools,
        max_tools_bytes=info.max_tools_bytes,
        # false and 0: a server that predates images and stop token sequences (it would
        # ignore them)
        accepts_images=info.accepts_images,
        max_images=info.max_images,
        max_image_bytes=info.max_image_bytes,
        max_image_pixels=info.max_image_pixels,
        max_stop_token_sequences=info.max_stop_token_sequences,
        max_stop_token_sequence_len=info.max_stop_token_sequence_len,
    )
