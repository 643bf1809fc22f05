"""Images in chat messages: a message's content as a sequence of text and image parts.

Torch-free and shared by the SDK and the server. The server decodes and
checks images (scheduler/treadle/scheduler/images.py); docs/vision.md.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

IMAGE_MIME_TYPES = ("image/png", "image/jpeg", "image/webp")


@dataclass(frozen=True, slots=True)
class TextPart:
    text: str


@dataclass(frozen=True, slots=True)
class ImagePart:
    """An encoded image (PNG, JPEG or WebP) and its MIME type."""

    data: bytes
    mime_type: str  # one of IMAGE_MIME_TYPES

    def __repr__(self) -> str:  # never dump the bytes into logs
        return f"ImagePart({len(self.data)} bytes, {self.mime_type!r})"


ContentPart = TextPart | ImagePart


class DataUrlError(ValueError):
    """A `data:` URL that cannot be an image; `str()` says why, without the field.
    `of_url`: the message is about the URL (callers put its name first), not the image."""

    def __init__(self, detail: str, of_url: bool = True) -> None:
        super().__init__(detail)
        self.of_url = of_url


def data_url_image(url: str, max_bytes: int | None = None) -> ImagePart:
    """The image of a `data:<MIME type>;base64,<data>` URL (the only URLs taken: a server
    fetches nothing). With `max_bytes`, an image larger than that is refused from its
    base64 length, before it is decoded. Raises DataUrlError; the MIME type is passed on
    as given (lower case), for the receiver to check."""
    if not url.startswith("data:"):
        raise DataUrlError(
            "must be a data: URL (data:image/png;base64,...); the server fetches no URL"
        )
    header, comma, data = url.removeprefix("data:").partition(",")
    if not comma or not header.endswith(";base64"):
        raise DataUrlError("must be base64: data:<MIME type>;base64,...")
    size = len(data.rstrip("=")) * 3 // 4  # what the base64 decodes to
    if max_bytes is not None and size > max_bytes:
        raise DataUrlError(f"the image is {size} bytes; the limit is {max_bytes}", of_url=False)
    try:
        decoded = base64.b64decode(data, validate=True)
    except binascii.Error:
        raise DataUrlError("holds data that is not base64") from None
    return ImagePart(decoded, header.removesuffix(";base64").partition(";")[0].strip().lower())
