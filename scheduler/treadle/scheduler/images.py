"""A chat's images, checked and decoded before anything is queued.

Runs where requests are validated (off the event loop, off the step thread).
Every check that costs nothing comes first: the count, each image's size in
bytes and its MIME type; then the header is read for the format and the
pixel count, and only an image within the pixel limit is decoded. Pillow is
imported on first use, so a text-only server never loads it.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..api.images import IMAGE_MIME_TYPES, ImagePart
from ..api.limits import RequestLimits
from ..api.params import ChatMessage
from .errors import ValidationError

_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}


@dataclass(frozen=True)
class DecodedImage:
    image: Any  # a PIL.Image.Image in RGB
    digest: bytes  # hash of the encoded bytes: the prefix cache's key for the picture


def image_parts(messages: Sequence[ChatMessage]) -> list[tuple[str, ImagePart]]:
    """Every image part of the chat, in order, with its wire field name."""
    return [
        (f"chat.messages[{i}].parts[{j}]", part)
        for i, m in enumerate(messages)
        for j, part in enumerate(m.parts)
        if isinstance(part, ImagePart)
    ]


def decode_images(
    messages: Sequence[ChatMessage], limits: RequestLimits, accepts_images: bool
) -> list[DecodedImage]:
    """The chat's images, decoded; raises ValidationError naming the message (content and
    parts both set), the chat (too many images) or the image part (sent to a model that
    does not take images or in a message not from the user; empty, too large, not
    PNG/JPEG/WebP, not decodable, too many pixels)."""
    for i, m in enumerate(messages):
        if m.parts and m.content:
            raise ValidationError(f"chat.messages[{i}]", "has both content and parts; send one")
        if m.role != "user" and any(isinstance(p, ImagePart) for p in m.parts):
            raise ValidationError(f"chat.messages[{i}].parts", "images are for user messages")
    parts = image_parts(messages)
    if len(parts) > limits.max_images:
        raise ValidationError("chat", f"at most {limits.max_images} images (got {len(parts)})")
    if parts and not accepts_images:
        raise ValidationError(parts[0][0], "the served model does not accept images")
    for field, part in parts:  # the free checks of every image before any decoding
        _check_encoded(field, part, limits)
    return [_decode(field, part, limits) for field, part in parts]


def _check_encoded(field: str, part: ImagePart, limits: RequestLimits) -> None:
    if not part.data:
        raise ValidationError(field, "the image is empty")
    if len(part.data) > limits.max_image_bytes:
        raise ValidationError(
            field, f"the image is {len(part.data)} bytes; the limit is {limits.max_image_bytes}"
        )
    if part.mime_type not in IMAGE_MIME_TYPES:
        raise ValidationError(
            field,
            f"MIME type {part.mime_type!r} is not one of {', '.join(IMAGE_MIME_TYPES)}",
        )


def _decode(field: str, part: ImagePart, limits: RequestLimits) -> DecodedImage:
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(part.data))  # reads the header only
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValidationError(
            field, f"is not a decodable image ({exc.__class__.__name__})"
        ) from exc
    if image.format != _FORMATS[part.mime_type]:
        raise ValidationError(
            field, f"the data is {image.format or 'of no known format'}, not {part.mime_type}"
        )
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise ValidationError(
            field,
            f"the image is {width}x{height} = {width * height} pixels; "
            f"the limit is {limits.max_image_pixels}",
        )
    try:
        rgb = image.convert("RGB")  # decodes
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValidationError(
            field, f"is not a decodable image ({exc.__class__.__name__})"
        ) from exc
    return DecodedImage(rgb, hashlib.blake2b(part.data, digest_size=16).digest())
