"""OpenAI's content parts -> the engine's: `{"type": "text", "text"}` and `{"type":
"image_url", "image_url": {"url": "data:image/png;base64,..."}}` (runs off the event loop).

Only data: URLs are taken: the server fetches nothing, so an http(s) URL is refused naming
its part. The checks both frontends make (image_parts.py): the chat's image count (field
`messages`) before any part is converted, and each image's size, estimated from its base64
length before it is decoded. The MIME type is passed on as given; decoding the image and
the rest of its checks are the engine's (docs/vision.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from ...api.images import ContentPart, DataUrlError, TextPart, data_url_image
from ...api.limits import RequestLimits
from ...scheduler.errors import ValidationError
from ..image_parts import check_image_count
from .protocol import ContentPart as ContentPartBody
from .protocol import Message


def content_field(index: int, j: int) -> str:
    """OpenAI's name of part `j` of message `index`."""
    return f"messages[{index}].content[{j}]"


def check_images(messages: Sequence[Message], limits: RequestLimits) -> None:
    """Refuse a chat with more than `limits.max_images` image parts (field `messages`)."""
    count = sum(
        part.type == "image_url"
        for m in messages
        if isinstance(m.content, list)
        for part in m.content
    )
    check_image_count("messages", count, limits)


def content_parts(
    index: int, parts: Sequence[ContentPartBody], limits: RequestLimits
) -> tuple[ContentPart, ...]:
    """The engine's parts of message `index`'s content list; an image over
    `limits.max_image_bytes` is refused before it is decoded."""
    return tuple(_part(content_field(index, j), part, limits) for j, part in enumerate(parts))


def _part(field: str, part: ContentPartBody, limits: RequestLimits) -> ContentPart:
    if part.type == "text" and part.text is not None:
        return TextPart(part.text)
    if part.type == "image_url" and part.image_url is not None:
        return _data_url_image(field, part.image_url.url, limits)
    raise ValidationError(
        field, f"parts of type {part.type[:32]!r} are not supported (text and image_url parts)"
    )


def _data_url_image(field: str, url: str, limits: RequestLimits) -> ContentPart:
    """The image of a `data:<MIME type>;base64,<data>` URL; any other URL is refused."""
    try:
        return data_url_image(url, limits.max_image_bytes)
    except DataUrlError as exc:
        raise ValidationError(field, f"image_url.url {exc}" if exc.of_url else str(exc)) from None
