"""Images in chat messages: a message's content as a sequence of text and image parts.

Torch-free and shared by the SDK and the server. The server decodes and
checks images (scheduler/treadle/scheduler/images.py); docs/vision.md.
"""

from __future__ import annotations

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
