"""The image flag of `treadle generate` and `treadle chat`: --image PATH (repeatable), a
PNG, JPEG or WebP file shown to the model before the question's text (generate: the
prompt, sent as a chat; chat: the next question). Read after parsing, so an unreadable
file or one of another format is a usage error naming the flag."""

from __future__ import annotations

import argparse

from ..api.images import ImagePart, TextPart
from ..api.params import ChatMessage
from .format_flags import FlagError, shown_path
from .images import image


def add_image_arguments(p: argparse.ArgumentParser, attached_to: str) -> None:
    p.add_argument(
        "--image",
        dest="image_paths",
        action="append",
        default=[],
        metavar="PATH",
        help=f"show the model the image in PATH (PNG, JPEG or WebP) before {attached_to}; "
        "repeatable; needs a model that accepts images (docs/vision.md)",
    )


def images_from_args(args: argparse.Namespace) -> list[ImagePart]:
    """The images the --image flags name, read; raises FlagError for a file that cannot
    be read or is not a PNG, JPEG or WebP image."""
    images = []
    for path in args.image_paths:
        try:
            images.append(image(path))
        except OSError as exc:
            detail = f"cannot read {shown_path(path)}: {exc.strerror or exc}"
            raise FlagError("--image", detail) from None
        except ValueError:
            detail = f"{shown_path(path)} is not a PNG, JPEG or WebP image"
            raise FlagError("--image", detail) from None
    return images


def user_message(text: str, images: list[ImagePart]) -> ChatMessage:
    """A user message: the images, then the text."""
    if not images:
        return ChatMessage("user", text)
    return ChatMessage("user", "", parts=(*images, TextPart(text)))
