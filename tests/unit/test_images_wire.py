"""Images and stop token sequences at the edge: a chat's text and image parts and a
request's stop token sequences from the SDK over the wire (gRPC, and OpenAI's HTTP bodies)
to the engine's GenerationRequest, the limits ModelInfo reports, and the refusals made
before anything is converted, naming `chat`, `chat.messages[i].parts[j]` or
`stop_token_sequences`, some through a real gRPC server on the tiny model."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import replace
from typing import Any

import grpc
import pytest
from e2e.served import Served, start_served
from PIL import Image
from test_response_format_wire import engine_info, model_info  # ModelInfo without a model

from treadle.api.images import ImagePart, TextPart
from treadle.api.limits import RequestLimits
from treadle.api.outcome import FinishReason
from treadle.api.params import ChatMessage, GenerationParams
from treadle.client import AsyncClient, InvalidArgument
from treadle.client.convert import model_info_from_proto, request_to_proto
from treadle.client.errors import error_from_rpc
from treadle.scheduler.engine import EngineConfig
from treadle.scheduler.errors import ValidationError
from treadle.scheduler.generation_request import GenerationRequest
from treadle.server.http.convert import chat_call, completion_call
from treadle.server.proto_convert import request_from_proto
from treadle.v1 import treadle_pb2 as pb
from treadle.worker.loader import LoadedModel


def encoded(kind: str = "PNG", size: tuple[int, int] = (4, 3)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "red").save(out, format=kind)
    return out.getvalue()


PNG = ImagePart(encoded(), "image/png")
JPEG = ImagePart(encoded("JPEG"), "image/jpeg")
CHAT = [
    ChatMessage("system", "Answer briefly."),
    ChatMessage("user", "", parts=(PNG, TextPart("and"), JPEG, TextPart("What differs?"))),
]


def to_engine(
    messages: list[ChatMessage] = CHAT, params: GenerationParams | None = None
) -> tuple[pb.GenerateRequest, GenerationRequest]:
    """The SDK's wire request, and the engine's view of it after the bytes."""
    msg = request_to_proto(messages, None, params or GenerationParams())
    wire = pb.GenerateRequest.FromString(msg.SerializeToString())
    return wire, request_from_proto(wire, RequestLimits())


def image_part(data: bytes, mime_type: str = "image/png") -> pb.ContentPart:
    return pb.ContentPart(image=pb.Image(data=data, mime_type=mime_type))


def chat(*parts: pb.ContentPart, messages: int = 1) -> pb.Chat:
    return pb.Chat(messages=[pb.ChatMessage(role="user", parts=parts) for _ in range(messages)])


# -- SDK -> wire -> engine ---------------------------------------------------------------
def test_parts_travel_from_the_sdk_to_the_engine_in_order() -> None:
    wire, gen = to_engine()
    assert gen.messages == CHAT
    sent = wire.chat.messages[1]
    assert sent.content == "" and [p.WhichOneof("part") for p in sent.parts] == [
        "image",
        "text",
        "image",
        "text",
    ]
    assert (sent.parts[0].image.data, sent.parts[0].image.mime_type) == (PNG.data, "image/png")
    assert sent.parts[3].text == "What differs?"
    assert not wire.chat.messages[0].parts  # a text message has none


def test_stop_token_sequences_travel_from_the_sdk_to_the_engine() -> None:
    wire, gen = to_engine(params=GenerationParams(stop_token_sequences=[[5, 6, 7], [9]]))
    assert [list(s.ids) for s in wire.stopping.stop_token_sequences] == [[5, 6, 7], [9]]
    assert gen.stop_token_sequences == [[5, 6, 7], [9]]
    assert to_engine()[1].stop_token_sequences == []


# -- refusals in the conversion ------------------------------------------------------------
def refusal(msg: pb.GenerateRequest, limits: RequestLimits | None = None) -> ValidationError:
    with pytest.raises(ValidationError) as refused:
        request_from_proto(msg, limits or RequestLimits())
    return refused.value


def test_too_many_images_are_refused_before_any_part_is_converted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    converted: list[object] = []
    monkeypatch.setattr(
        "treadle.server.proto_convert.part_from_proto", lambda *a: converted.append(a)
    )
    two_each = chat(image_part(PNG.data), image_part(PNG.data), messages=2)
    error = refusal(pb.GenerateRequest(chat=two_each), RequestLimits(max_images=3))
    assert (error.field, str(error)) == ("chat", "chat: at most 3 images (got 4)")
    assert converted == []


def test_an_image_over_the_byte_limit_is_refused_before_any_part_is_converted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    converted: list[object] = []
    monkeypatch.setattr(
        "treadle.server.proto_convert.part_from_proto", lambda *a: converted.append(a)
    )
    msg = pb.GenerateRequest(
        chat=pb.Chat(
            messages=[
                pb.ChatMessage(role="user", parts=[image_part(b"x" * 10)]),
                pb.ChatMessage(
                    role="user", parts=[pb.ContentPart(text="hi"), image_part(b"x" * 11)]
                ),
            ]
        )
    )
    error = refusal(msg, RequestLimits(max_image_bytes=10))
    assert (error.field, str(error)) == (
        "chat.messages[1].parts[1]",
        "chat.messages[1].parts[1]: the image is 11 bytes; the limit is 10",
    )
    assert converted == []


def test_a_part_with_neither_text_nor_image_is_refused_naming_it() -> None:
    message = pb.ChatMessage(role="user", parts=[pb.ContentPart(text="a"), pb.ContentPart()])
    error = refusal(pb.GenerateRequest(chat=pb.Chat(messages=[message])))
    assert (error.field, str(error)) == (
        "chat.messages[0].parts[1]",
        "chat.messages[0].parts[1]: must set text or image",
    )


def test_too_many_stop_token_sequences_are_refused_before_converting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("treadle.server.proto_convert.GenerationRequest", pytest.fail)
    sequences = [pb.TokenIds(ids=[i + 1]) for i in range(3)]
    msg = pb.GenerateRequest(
        prompt="hi", stopping=pb.StoppingParameters(stop_token_sequences=sequences)
    )
    error = refusal(msg, RequestLimits(max_stop_token_sequences=2))
    assert (error.field, str(error)) == (
        "stop_token_sequences",
        "stop_token_sequences: at most 2 sequences (got 3)",
    )


# -- ModelInfo -----------------------------------------------------------------------------
def test_model_info_reports_the_image_and_sequence_limits() -> None:
    limits = replace(
        RequestLimits(),
        max_images=3,
        max_image_bytes=1000,
        max_image_pixels=640 * 480,
        max_stop_token_sequences=5,
        max_stop_token_sequence_len=7,
    )
    wire = model_info(replace(engine_info(limits, ()), accepts_images=True))
    expected = (True, 3, 1000, 640 * 480, 5, 7)
    sdk = model_info_from_proto(wire)
    for info in (wire, sdk):
        assert (
            info.accepts_images,
            info.max_images,
            info.max_image_bytes,
            info.max_image_pixels,
            info.max_stop_token_sequences,
            info.max_stop_token_sequence_len,
        ) == expected
    assert model_info(engine_info(limits, ())).accepts_images is False
    old = model_info_from_proto(pb.ModelInfoResponse())
    assert (old.accepts_images, old.max_images, old.max_stop_token_sequences) == (False, 0, 0)


# -- OpenAI's bodies (HTTP) -------------------------------------------------------------------
def data_url(data: bytes, mime_type: str = "image/png") -> str:
    return f"data:{mime_type};base64,{base64.b64encode(data).decode()}"


def chat_body(*content: Any, **extra: Any) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": list(content)}], **extra}
    return json.dumps(body).encode()


def image_url(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, "detail": "low"}}


def http_refusal(raw: bytes, limits: RequestLimits | None = None) -> ValidationError:
    with pytest.raises(ValidationError) as refused:
        chat_call(raw, limits or RequestLimits(), 1 << 24)
    return refused.value


def test_a_data_url_image_reaches_the_engine_as_the_grpc_one_does() -> None:
    raw = chat_body(
        {"type": "text", "text": "Compare"},
        image_url(data_url(PNG.data)),
        image_url(data_url(JPEG.data, "image/jpeg")),
    )
    (message,) = chat_call(raw, RequestLimits(), 1 << 24).gen.messages or []
    assert message == ChatMessage("user", "", parts=(TextPart("Compare"), PNG, JPEG))


def test_text_parts_only_are_one_string() -> None:
    raw = chat_body({"type": "text", "text": "a"}, {"type": "text", "text": "b"})
    (message,) = chat_call(raw, RequestLimits(), 1 << 24).gen.messages or []
    assert message == ChatMessage("user", "ab")


@pytest.mark.parametrize(
    ("part", "detail"),
    [
        (image_url("https://example.com/cat.png"), "image_url.url must be a data: URL"),
        (image_url("data:image/png,rawbytes"), "image_url.url must be base64"),
        (image_url("data:image/png;base64,@@@@"), "image_url.url holds data that is not base64"),
        ({"type": "input_audio", "input_audio": {}}, "parts of type 'input_audio'"),
    ],
)
def test_a_bad_part_is_refused_naming_it(part: dict[str, Any], detail: str) -> None:
    error = http_refusal(chat_body({"type": "text", "text": "look"}, part))
    assert error.field == "messages[0].content[1]"
    assert str(error).startswith(f"messages[0].content[1]: {detail}")


def test_the_http_image_limits_are_checked_before_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("base64.b64decode", pytest.fail)
    big = data_url(b"x" * 12)  # 16 base64 characters: 12 bytes
    error = http_refusal(chat_body(image_url(big)), RequestLimits(max_image_bytes=11))
    assert str(error) == "messages[0].content[0]: the image is 12 bytes; the limit is 11"
    many = [image_url(data_url(b"x"))] * 3
    error = http_refusal(chat_body(*many), RequestLimits(max_images=2))
    assert (error.field, str(error)) == ("messages", "messages: at most 2 images (got 3)")


def test_stop_token_sequences_over_http() -> None:
    raw = chat_body({"type": "text", "text": "hi"}, stop_token_sequences=[[1, 2], [3]])
    assert chat_call(raw, RequestLimits(), 1 << 24).gen.stop_token_sequences == [[1, 2], [3]]
    body = {"model": "m", "prompt": "hi", "stop_token_sequences": [[4]]}
    call = completion_call(json.dumps(body).encode(), RequestLimits(), 1 << 24)
    assert call.gens[0].stop_token_sequences == [[4]]


# -- through a real server ---------------------------------------------------------------
async def refused_field(served: Served, request: pb.GenerateRequest) -> InvalidArgument:
    request.stopping.max_new_tokens = 4
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await served.stub.Generate(request, timeout=60)
    error = error_from_rpc(refused.value)
    assert isinstance(error, InvalidArgument), error
    return error


async def test_the_server_refuses_images_over_the_limits_naming_the_field(
    tiny: LoadedModel,
) -> None:
    """Limits below the default request size (4 MiB, as the default max_image_bytes); the
    tiny model is text-only."""
    limits = RequestLimits(max_images=2, max_image_bytes=1000)
    config = EngineConfig(max_batch_rows=2, max_seq_len=256, limits=limits)
    many = chat(*[image_part(PNG.data)] * 3)
    big = chat(pb.ContentPart(text="hi"), image_part(b"x" * 1001))
    empty = chat(pb.ContentPart())
    both = pb.Chat(
        messages=[pb.ChatMessage(role="user", content="a", parts=[pb.ContentPart(text="b")])]
    )
    text_only = chat(pb.ContentPart(text="What is it?"), image_part(PNG.data))
    served = await start_served(tiny, config)
    try:
        errors = [
            await refused_field(served, pb.GenerateRequest(chat=c))
            for c in (many, big, empty, both, text_only)
        ]
    finally:
        await served.stop()
    assert [(e.field, str(e)) for e in errors] == [
        ("chat", "chat: at most 2 images (got 3)"),
        (
            "chat.messages[0].parts[1]",
            "chat.messages[0].parts[1]: the image is 1001 bytes; the limit is 1000",
        ),
        ("chat.messages[0].parts[0]", "chat.messages[0].parts[0]: must set text or image"),
        # the engine's refusals, named as on the wire
        ("chat.messages[0]", "chat.messages[0]: has both content and parts; send one"),
        (
            "chat.messages[0].parts[1]",
            "chat.messages[0].parts[1]: the served model does not accept images",
        ),
    ]


async def test_the_sdk_reads_the_servers_image_and_sequence_limits(served: Served) -> None:
    async with AsyncClient(served.target, timeout=60) as client:
        info = await client.model_info()
        assert (info.max_images, info.max_image_bytes, info.max_image_pixels) == (
            8,
            4 * 2**20,
            4096 * 4096,
        )
        assert (info.max_stop_token_sequences, info.max_stop_token_sequence_len) == (16, 64)
        with pytest.raises(InvalidArgument) as local:  # refused before sending
            await client.generate("hi", stop_token_sequences=[[1]] * 17, max_new_tokens=2)
    assert local.value.code is None and local.value.field == "stop_token_sequences"


async def test_a_stop_token_sequence_ends_the_output_on_the_server(served: Served) -> None:
    async with AsyncClient(served.target, timeout=60) as client:
        free = await client.generate("hello", max_new_tokens=8, ignore_eos=True)
        ids = list(free.token_ids)
        stop = ids[2:4]
        first = next(i for i in range(len(ids) - 1) if ids[i : i + 2] == stop)
        stopped = await client.generate(
            "hello", max_new_tokens=8, ignore_eos=True, stop_token_sequences=[stop]
        )
    assert stopped.reason is FinishReason.STOP_TOKEN
    assert list(stopped.token_ids) == ids[: first + 2]
