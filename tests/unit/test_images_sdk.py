"""The SDK's images and stop token sequences, without a server: the shapes a message's
content parts may be given in and the wire request they make, image() from a path,
bytes or a PIL image, the checks made before sending, and the CLI's --image and
--stop-token-sequence flags."""

from __future__ import annotations

import argparse
import base64
import io
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from treadle.api.images import ImagePart, TextPart
from treadle.api.limits import RequestLimits
from treadle.api.outcome import FinishReason, Usage
from treadle.api.params import ChatMessage
from treadle.client import AsyncClient, InvalidArgument, image
from treadle.client import commands as commands_module
from treadle.client.cli import params_from_args, parse
from treadle.client.images import sniff_mime_type
from treadle.client.results import Finish, TokenChunk
from treadle.v1 import treadle_pb2 as pb


def encoded(kind: str, size: tuple[int, int] = (3, 2)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "blue").save(out, format=kind)
    return out.getvalue()


PNG, JPEG, WEBP = encoded("PNG"), encoded("JPEG"), encoded("WEBP")
QUESTION = "What is in the picture?"
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


async def build(messages: Any, limits: RequestLimits | None = None, **kw: Any) -> Any:
    """The wire request the client would send (nothing is sent)."""
    async with AsyncClient(limits=limits) as client:
        if "accepts_images" in kw:
            client.accepts_images = kw.pop("accepts_images")
        return client.build_request(messages, None, None, "", kw)


async def refused(messages: Any, limits: RequestLimits | None = None, **kw: Any) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as error:
        await build(messages, limits, **kw)
    assert error.value.code is None  # refused locally
    return error.value


def sent_parts(msg: pb.GenerateRequest, index: int = 0) -> list[tuple[str, Any]]:
    """(kind, value) of each part of message `index`: text, or (bytes, MIME type)."""
    parts = []
    for part in msg.chat.messages[index].parts:
        if part.WhichOneof("part") == "text":
            parts.append(("text", part.text))
        else:
            parts.append(("image", (part.image.data, part.image.mime_type)))
    return parts


# -- image() -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "mime_type"),
    [(PNG, "image/png"), (JPEG, "image/jpeg"), (WEBP, "image/webp"), (b"GIF89a...", None)],
)
def test_the_format_is_sniffed_from_the_magic_bytes(data: bytes, mime_type: str | None) -> None:
    assert sniff_mime_type(data) == mime_type


def test_image_from_a_path_bytes_or_a_pil_image(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(JPEG)
    assert image(path) == image(str(path)) == ImagePart(JPEG, "image/jpeg")
    assert image(WEBP) == ImagePart(WEBP, "image/webp")
    assert image(b"\x00raw", "image/png") == ImagePart(b"\x00raw", "image/png")  # as told
    picture = image(Image.new("RGB", (5, 4), "green"))
    assert picture.mime_type == "image/png" and sniff_mime_type(picture.data) == "image/png"
    assert Image.open(io.BytesIO(picture.data)).size == (5, 4)
    with pytest.raises(ValueError, match="not a PNG, JPEG or WebP image"):
        image(b"GIF89a")
    with pytest.raises(TypeError, match="takes a path, bytes or a PIL image, not int"):
        image(3)
    with pytest.raises(OSError):
        image(tmp_path / "missing.png")


def test_the_sdk_does_not_import_pillow() -> None:
    code = (
        "import sys; from treadle.client import Client, image; "
        "image(bytes.fromhex('89504e470d0a1a0a')); assert 'PIL' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_image_part_never_dumps_its_bytes() -> None:
    assert repr(ImagePart(PNG, "image/png")) == f"ImagePart({len(PNG)} bytes, 'image/png')"


# -- content shapes ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "picture",
    [
        ImagePart(PNG, "image/png"),
        {"type": "image", "image": PNG},
        {"type": "image", "image": Image.open(io.BytesIO(PNG))},
        {"type": "image_url", "image_url": {"url": PNG_URL}},
        {"type": "image_url", "image_url": PNG_URL},
    ],
    ids=["ImagePart", "bytes", "PIL", "openai", "url-string"],
)
async def test_each_image_shape_makes_the_same_wire_parts(picture: Any) -> None:
    for text in (QUESTION, {"type": "text", "text": QUESTION}, TextPart(QUESTION)):
        msg = await build([{"role": "user", "content": [picture, text]}])
        (kind, (data, mime_type)), second = sent_parts(msg)
        assert (kind, mime_type, second) == ("image", "image/png", ("text", QUESTION))
        assert Image.open(io.BytesIO(data)).size == (3, 2)  # PIL re-encodes: same picture
        assert msg.chat.messages[0].content == ""


async def test_an_image_from_a_path_in_a_dict(tmp_path: Path) -> None:
    path = tmp_path / "photo.webp"
    path.write_bytes(WEBP)
    msg = await build([{"role": "user", "content": [{"type": "image", "image": str(path)}, "?"]}])
    assert sent_parts(msg)[0] == ("image", (WEBP, "image/webp"))


async def test_text_only_parts_are_one_string_and_chat_messages_keep_their_parts() -> None:
    msg = await build([{"role": "user", "content": ["a", {"type": "text", "text": "b"}]}])
    assert (msg.chat.messages[0].content, sent_parts(msg)) == ("ab", [])
    given = ChatMessage("user", "", parts=(TextPart("only text"),))
    assert sent_parts(await build([given])) == [("text", "only text")]


@pytest.mark.parametrize(
    ("content", "field", "message"),
    [
        ([3], "chat.messages[0].parts[0]", "must be a string, a part or a dict, not int"),
        ([{"type": "audio"}], "chat.messages[0].parts[0]", 'must be {"type": "text", "text"}'),
        (
            [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}],
            "chat.messages[0].parts[0]",
            "image_url must be a data: URL",
        ),
        (
            [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}],
            "chat.messages[0].parts[0]",
            "image_url holds data that is not base64",
        ),
        (
            ["x", {"type": "image", "image": b"GIF89a"}],
            "chat.messages[0].parts[1]",
            "image(): not a PNG, JPEG or WebP image",
        ),
        (
            [ImagePart(b"GIF89a", "image/gif")],
            "chat.messages[0].parts[0]",
            "MIME type 'image/gif' is not one of image/png, image/jpeg, image/webp",
        ),
        (7, "chat.messages[0].content", "must be a string or a list of parts"),
    ],
)
async def test_a_malformed_part_is_refused_naming_the_wire_field(
    content: Any, field: str, message: str
) -> None:
    error = await refused([{"role": "user", "content": content}])
    assert error.field == field and str(error).startswith(f"{field}: {message}")


async def test_the_servers_limits_are_checked_before_sending_when_known() -> None:
    picture = ImagePart(PNG, "image/png")
    three = [
        {"role": "user", "content": [picture, picture]},
        {"role": "user", "content": [picture]},
    ]
    limits = RequestLimits(max_images=2, max_image_bytes=len(PNG) - 1)
    error = await refused(three, limits)
    assert (error.field, str(error)) == ("chat", "chat: at most 2 images (got 3)")
    error = await refused(three[1:], limits)
    assert str(error) == (
        f"chat.messages[0].parts[0]: the image is {len(PNG)} bytes; the limit is {len(PNG) - 1}"
    )
    error = await refused(three[1:], accepts_images=False)
    assert str(error) == "chat.messages[0].parts[0]: the served model does not accept images"
    assert len((await build(three * 10)).chat.messages) == 20  # unknown: the server's limits
    assert (await build(three[1:], accepts_images=True)).chat.messages[0].parts


async def test_stop_token_sequences_are_sent_and_checked() -> None:
    msg = await build("hi", stop_token_sequences=[[1, 2], [3]])
    assert [list(s.ids) for s in msg.stopping.stop_token_sequences] == [[1, 2], [3]]
    error = await refused("hi", stop_token_sequences=[[1], []])
    assert str(error) == "stop_token_sequences[1]: must not be empty"
    limits = RequestLimits(max_stop_token_sequences=1, max_stop_token_sequence_len=2)
    error = await refused("hi", limits, stop_token_sequences=[[1], [2]])
    assert str(error) == "stop_token_sequences: at most 1 sequences (got 2)"
    error = await refused("hi", limits, stop_token_sequences=[[1, 2, 3]])
    assert str(error) == "stop_token_sequences[0]: at most 2 ids (got 3)"


# -- the CLI -----------------------------------------------------------------------------
def test_the_image_and_stop_token_sequence_flags(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(PNG)
    (tmp_path / "b.jpg").write_bytes(JPEG)
    args = parse(
        [
            "generate",
            "--image",
            str(tmp_path / "a.png"),
            "--image",
            str(tmp_path / "b.jpg"),
            "--stop-token-sequence",
            "1,2,3",
            "--stop-token-sequence",
            "4",
            QUESTION,
        ]
    )
    assert args.images == [ImagePart(PNG, "image/png"), ImagePart(JPEG, "image/jpeg")]
    assert params_from_args(args).stop_token_sequences == [[1, 2, 3], [4]]
    assert (
        parse(["chat"]).images == []
        and params_from_args(parse(["chat"])).stop_token_sequences == []
    )


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as usage:
        parse(list(argv))
    assert usage.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_image_flags_are_usage_errors_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gif = tmp_path / "a.gif"
    gif.write_bytes(b"GIF89a")
    missing = tmp_path / "missing.png"
    assert usage_error(capsys, "chat", "--image", str(gif)) == (
        f"treadle: error: argument --image: {str(gif)!r} is not a PNG, JPEG or WebP image"
    )
    assert usage_error(capsys, "generate", "hi", "--image", str(missing)).startswith(
        f"treadle: error: argument --image: cannot read {str(missing)!r}"
    )
    assert "invalid token_ids value" in usage_error(
        capsys, "generate", "hi", "--stop-token-sequence", "1,x"
    )


class ScriptedClient:
    """Answers each stream() with a short text and records the messages asked about."""

    def __init__(self) -> None:
        self.asked: list[str | list[ChatMessage]] = []  # each prompt, as it was then

    def __enter__(self) -> ScriptedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def stream(self, prompt: Any, **kwargs: Any) -> list[TokenChunk | Finish]:
        self.asked.append(prompt if isinstance(prompt, str) else list(prompt))
        usage = Usage(5, 0, 1, 0.0, 0.01, 0.1)
        return [TokenChunk("r", (1,), "ok"), Finish("r", FinishReason.EOS, usage)]


def run_verb(
    verb: str, argv: list[str], monkeypatch: pytest.MonkeyPatch, lines: Sequence[str] = ()
) -> ScriptedClient:
    client = ScriptedClient()
    monkeypatch.setattr(commands_module, "client_from_args", lambda args: client)
    answers = iter(lines)

    def ask(prompt: str) -> str:
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", ask)
    args: argparse.Namespace = parse([verb, *argv])
    assert getattr(commands_module, verb)(args) == 0
    return client


def test_generate_with_an_image_sends_one_user_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.png").write_bytes(PNG)
    client = run_verb("generate", ["--image", str(tmp_path / "a.png"), QUESTION], monkeypatch)
    assert client.asked == [
        [ChatMessage("user", "", parts=(ImagePart(PNG, "image/png"), TextPart(QUESTION)))]
    ]
    plain = run_verb("generate", [QUESTION], monkeypatch)
    assert plain.asked == [QUESTION]  # a raw prompt without --image


def test_chat_attaches_the_images_to_the_first_question(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.png").write_bytes(PNG)
    argv = ["--image", str(tmp_path / "a.png")]
    client = run_verb("chat", argv, monkeypatch, ["What is it?", "And now?"])
    picture = ImagePart(PNG, "image/png")
    first = ChatMessage("user", "", parts=(picture, TextPart("What is it?")))
    assert client.asked == [
        [first],
        [first, ChatMessage("assistant", "ok"), ChatMessage("user", "And now?")],
    ]
