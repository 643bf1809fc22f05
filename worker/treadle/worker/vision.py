"""Images in the packed forward: a request's image inputs, their features, their embeddings.

A vision-language model's processor expands each image's placeholder in the
prompt into the model's image tokens (one id repeated) and turns the images
into tensors (`pixel_values`, ...). The worker runs the vision tower once per
request, on the step where its prefill first reaches an image token (batched
across the requests of that step when their tensors have the same shape), and
keeps the features on the request's `ImageInputs`; every prefill chunk then
takes the slice of features for the image tokens it holds and places it into
the input embeddings of the packed forward, where the model's own forward
would (`masked_scatter` over the image tokens). Decode is text only. docs/vision.md.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(eq=False)
class ImageInputs:
    """A request's images as its model takes them, and their features once computed.

    Owned by the request: kept across preemption (a resumed request does not run
    the vision tower again), shared by its samples (which never prefill images).
    """

    pixels: dict[str, torch.Tensor]  # the processor's image tensors, batch dim = images
    positions: list[int]  # prompt positions of the image tokens, ascending
    keys: list[int]  # per image token: its image's key in the prefix cache (negative)
    features: torch.Tensor | None = None  # [len(positions), hidden], once computed

    @classmethod
    def build(
        cls,
        pixels: dict[str, torch.Tensor],
        prompt_ids: Sequence[int],
        image_token_id: int,
        hashes: Sequence[bytes],
    ) -> ImageInputs:
        """The inputs of a prompt whose image tokens are `image_token_id`, for images of
        content hashes `hashes`. Each image's tokens get the image's key when the prompt
        holds one run of image tokens per image (as LLaVA and DeepSeek-VL write them);
        otherwise every image token gets the key of all the images together."""
        positions = [p for p, t in enumerate(prompt_ids) if t == image_token_id]
        runs = [i for i, p in enumerate(positions) if i == 0 or positions[i - 1] != p - 1]
        if len(runs) == len(hashes):
            bounds = [*runs, len(positions)]
            keys = [
                _key(h)
                for h, a, b in zip(hashes, bounds, bounds[1:], strict=False)
                for _ in range(a, b)
            ]
        else:
            keys = [_key(b"".join(hashes))] * len(positions)
        return cls(pixels, positions, keys)

    def rows(self, start: int, end: int) -> tuple[int, int]:
        """The feature rows [lo, hi) of the image tokens at positions [start, end)."""
        return bisect.bisect_left(self.positions, start), bisect.bisect_left(self.positions, end)

    def tensors(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The image tensors on `device`, floating ones in `dtype`."""
        return {
            k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
            for k, v in self.pixels.items()
        }


def _key(content: bytes) -> int:
    """A negative 63-bit id for content: never a token id, equal only for equal content."""
    digest = hashlib.blake2b(content, digest_size=8).digest()
    return -(int.from_bytes(digest, "little") >> 1) - 1


def compute_features(
    model: Any, inputs: Sequence[ImageInputs], device: torch.device, dtype: torch.dtype
) -> None:
    """Run the vision tower for `inputs` (those without features yet), once for all whose
    tensors stack (same keys and shapes but the image count), else group by group."""
    groups: dict[tuple[Any, ...], list[ImageInputs]] = {}
    for item in inputs:
        if item.features is None:
            key = tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in sorted(item.pixels.items()))
            groups.setdefault(key, []).append(item)
    for group in groups.values():
        tensors = [g.tensors(device, dtype) for g in group]
        batch = {k: torch.cat([t[k] for t in tensors]) for k in tensors[0]}  # [images, ...]
        features = image_features(model, batch)  # [image tokens of the group, hidden]
        sizes = [len(g.positions) for g in group]
        if features.shape[0] != sum(sizes):
            raise RuntimeError(
                f"the vision tower gave {features.shape[0]} feature rows for "
                f"{sum(sizes)} image tokens"
            )
        for item, part in zip(group, features.split(sizes), strict=True):
            item.features = part
            item.pixels = {}  # not needed again (a resumed request keeps its features)


def image_features(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's image features for `batch` as one `[tokens, hidden]` tensor, whatever
    shape its `get_image_features` returns them in (a tensor, a list of per-image
    tensors, or an output whose `pooler_output` holds them, by transformers version)."""
    owner = model if hasattr(model, "get_image_features") else model.model
    out = owner.get_image_features(**batch)
    if not isinstance(out, torch.Tensor | list | tuple):
        out = out.pooler_output
    if isinstance(out, list | tuple):
        out = torch.cat([o.reshape(-1, o.shape[-1]) for o in out])
    return out.reshape(-1, out.shape[-1])


def embed_with_images(
    model: Any,
    input_ids: torch.Tensor,
    chunks: Sequence[tuple[int, int, int, ImageInputs]],
) -> torch.Tensor:
    """The packed sequence's input embeddings `[1, T, hidden]` with image features in place.

    `input_ids` is `[1, T]`; each chunk is (offset in the packed sequence, first position,
    token count, the row's images): the features of the image tokens among those
    positions replace their token embeddings.
    """
    embeds = model.get_input_embeddings()(input_ids)  # [1, T, hidden]
    for offset, start, count, images in chunks:
        lo, hi = images.rows(start, start + count)
        if lo == hi:
            continue
        assert images.features is not None, "features are computed before the forward"
        at = torch.tensor(images.positions[lo:hi], device=embeds.device) - start + offset
        embeds[0, at] = images.features[lo:hi].to(embeds.dtype)
    return embeds
