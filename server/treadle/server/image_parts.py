"""Images at the frontends' door: the checks both frontends (gRPC and HTTP) make before
converting a chat's image parts, so an oversized request is refused before it costs work.

Each frontend reads its own wire shape (protobuf parts, OpenAI `image_url` data URLs) and
names its own fields; the limits and the messages are the same. Decoding an image, its
pixel count and whether the model accepts images are the engine's checks (docs/vision.md).
"""

from __future__ import annotations

from ..api.limits import RequestLimits
from ..scheduler.errors import ValidationError


def check_image_count(field: str, count: int, limits: RequestLimits) -> None:
    """Refuse a chat whose messages hold more than `limits.max_images` images in all."""
    if count > limits.max_images:
        raise ValidationError(field, f"at most {limits.max_images} images (got {count})")


def check_image_bytes(field: str, size: int, limits: RequestLimits) -> None:
    """Refuse an image of more than `limits.max_image_bytes` encoded bytes (`size`)."""
    if size > limits.max_image_bytes:
        raise ValidationError(
            field, f"the image is {size} bytes; the limit is {limits.max_image_bytes}"
        )
