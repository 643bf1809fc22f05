"""Images in the SDK: the shapes a message's content parts may be given in, `image()`, and
the checks made before sending.

    from treadle.client import Client, image

    question = [{"role": "user", "content": [image("cat.png"), "What is in the picture?"]}]
    print(client.generate(question, max_new_tokens=64).text)

A message's `content` may be a string or a list of parts, in order: a string or
`{"type": "text", "text": ...}` (text), `{"type": "image", "image": <path | bytes |
PIL.Image.Image>}` (optionally with "mime_type"), OpenAI's `{"type": "image_url",
"image_url": {"url": "data:image/png;base64,..."}}` (data: URLs only: the server fetches
nothing), or a TextPart / ImagePart. A list of text parts only is sent as one string.
Images need a model that accepts them (`ModelInfo.accepts_images`); a malformed part
raises ParameterError naming the wire field (`chat.messages[i].parts[j]`), which the
clients raise as InvalidArgument. How the server serves images: docs/vision.md.

Pillow is needed only to pass a PIL image (encoded as PNG); the SDK never imports it.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..api.checks import ParameterError
from ..api.images import (
    IMAGE_MIME_TYPES,
    ContentPart,
    DataUrlError,
    ImagePart,
    TextPart,
    data_url_image,
)
from ..api.limits import RequestLimits
from ..api.params import ChatMessage

# The encoded image formats by their first bytes (WebP: RIFF....WEBP).
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
)
_WEBP = (b"RIFF", b"WEBP")

PartLike = str | TextPart | ImagePart | Mapping[str, Any]


def image(source: str | os.PathLike[str] | bytes | Any, mime_type: str | None = None) -> ImagePart:
    """An image part from a file path (read), encoded bytes, or a PIL image (encoded as
    PNG). `mime_type` None: sniffed from the bytes (PNG, JPEG or WebP); raises ValueError
    when it cannot be told, and OSError when the file cannot be read."""
    if isinstance(source, str | os.PathLike):
        data = Path(source).read_bytes()
    elif isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    elif _is_pil_image(source):
        data, mime_type = _png_of(source), mime_type or "image/png"
    else:
        raise TypeError(f"image() takes a path, bytes or a PIL image, not {type(source).__name__}")
    mime_type = mime_type or sniff_mime_type(data)
    if mime_type is None:
        raise ValueError("image(): not a PNG, JPEG or WebP image (pass mime_type= to say which)")
    return ImagePart(data, mime_type)


def sniff_mime_type(data: bytes) -> str | None:
    """The MIME type of encoded image bytes by their magic bytes; None for another format."""
    for magic, mime_type in _MAGIC:
        if data.startswith(magic):
            return mime_type
    if data[:4] == _WEBP[0] and data[8:12] == _WEBP[1]:
        return "image/webp"
    return None


def as_parts(content: Sequence[PartLike], field: str) -> tuple[ContentPart, ...]:
    """The parts of a content list; `field` names the message (`chat.messages[i]`)."""
    if isinstance(content, str | bytes):
        raise ParameterError(f"{field}.content", "must be a string or a list of parts")
    return tuple(as_part(part, f"{field}.parts[{j}]") for j, part in enumerate(content))


def as_part(part: PartLike, field: str) -> ContentPart:
    """A ContentPart from one of the shapes the module docstring lists."""
    if isinstance(part, TextPart | ImagePart):
        return part
    if isinstance(part, str):
        return TextPart(part)
    if not isinstance(part, Mapping):
        shown = type(part).__name__
        raise ParameterError(field, f"must be a string, a part or a dict, not {shown}")
    kind = part.get("type")
    if kind == "text" and isinstance(part.get("text"), str):
        return TextPart(part["text"])
    if kind == "image" and "image" in part:
        try:
            return image(part["image"], part.get("mime_type"))
        except (TypeError, ValueError, OSError) as exc:
            raise ParameterError(field, str(exc)) from None
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, Mapping) else url
        return _data_url_image(url, field)
    shapes = '{"type": "text", "text"}, {"type": "image", "image"} or {"type": "image_url"}'
    raise ParameterError(field, f"must be {shapes}")


def check_images(
    messages: Sequence[ChatMessage], limits: RequestLimits | None, accepts_images: bool | None
) -> None:
    """Refuse what the server would refuse of a chat's images, before sending: a MIME type
    not in IMAGE_MIME_TYPES; when the server is known (`model_info()`), any image for a
    model that does not accept images, more than `max_images` in all (field `chat`), and
    one over `max_image_bytes`. Raises ParameterError naming the wire field."""
    images = [
        (f"chat.messages[{i}].parts[{j}]", part)
        for i, m in enumerate(messages)
        for j, part in enumerate(m.parts)
        if isinstance(part, ImagePart)
    ]
    if images and accepts_images is False:
        raise ParameterError(images[0][0], "the served model does not accept images")
    if limits is not None and len(images) > limits.max_images:
        raise ParameterError("chat", f"at most {limits.max_images} images (got {len(images)})")
    for field, part in images:
        if part.mime_type not in IMAGE_MIME_TYPES:
            kinds = ", ".join(IMAGE_MIME_TYPES)
            raise ParameterError(field, f"MIME type {part.mime_type!r} is not one of {kinds}")
        if limits is not None and len(part.data) > limits.max_image_bytes:
            raise ParameterError(
                field,
                f"the image is {len(part.data)} bytes; the limit is {limits.max_image_bytes}",
            )


def _data_url_image(url: Any, field: str) -> ImagePart:
    """The image of a `data:<MIME type>;base64,<data>` URL; the server fetches no URL."""
    if not isinstance(url, str):
        raise ParameterError(field, "image_url must be a data: URL, or use image()")
    try:
        return data_url_image(url)
    except DataUrlError as exc:
        raise ParameterError(field, f"image_url {exc}" if exc.of_url else str(exc)) from None


def _is_pil_image(source: Any) -> bool:
    """Whether `source` is a PIL image (none can exist unless PIL was imported)."""
    pil_image = sys.modules.get("PIL.Image")
    return pil_image is not None and isinstance(source, pil_image.Image)


def _png_of(picture: Any) -> bytes:
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()
