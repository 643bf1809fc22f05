"""The VLM workload's requests: seeded pictures, each with a short question, for the engine
(as `GenerationRequest`s) and for `generate` (as the processor's inputs, left padded)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from treadle.api.images import ImagePart, TextPart
from treadle.api.params import ChatMessage
from treadle.scheduler.generation_request import GenerationRequest

from .vlm_models import png

QUESTIONS = (
    "What is in this picture?",
    "Describe the colours of this image.",
    "Is this a photograph or a drawing?",
    "What would you call this picture?",
    "Which part of the image is the brightest?",
    "Describe the image in one sentence.",
    "Does this picture show any people?",
    "What mood does this image give?",
)


@dataclass(frozen=True, slots=True)
class ImageQuestion:
    """One request of the workload: a picture and a question about it, in one user message."""

    id: str
    image: bytes  # PNG
    question: str

    def generation_request(self, max_new_tokens: int) -> GenerationRequest:
        """Greedy, exactly `max_new_tokens` (EOS ignored)."""
        parts = (ImagePart(self.image, "image/png"), TextPart(self.question))
        return GenerationRequest(
            messages=[ChatMessage("user", "", parts=parts)],
            max_new_tokens=max_new_tokens,
            ignore_eos=True,
            request_id=self.id,
        )

    def chat(self) -> list[dict[str, Any]]:
        """The message as a processor's chat template takes it (the image as a placeholder)."""
        content = [{"type": "image"}, {"type": "text", "text": self.question}]
        return [{"role": "user", "content": content}]

    def picture(self) -> Any:
        """The decoded RGB picture (a PIL image)."""
        from PIL import Image

        return Image.open(io.BytesIO(self.image)).convert("RGB")


def image_questions(count: int, image_size: int, seed: int) -> list[ImageQuestion]:
    """`count` distinct random `image_size` x `image_size` PNG pictures (seeded), each with
    one of `QUESTIONS` in turn."""
    size = (image_size, image_size)
    return [
        ImageQuestion(f"img{i}", png(seed + i, size), QUESTIONS[i % len(QUESTIONS)])
        for i in range(count)
    ]


def text_chat(index: int, max_new_tokens: int) -> GenerationRequest:
    """A text-only chat (one of `QUESTIONS`, no picture): greedy, EOS ignored."""
    return GenerationRequest(
        messages=[ChatMessage("user", QUESTIONS[index % len(QUESTIONS)])],
        max_new_tokens=max_new_tokens,
        ignore_eos=True,
        request_id=f"text{index}",
    )


def processor_inputs(processor: Any, items: list[ImageQuestion]) -> dict[str, Any]:
    """The processor's tensors for `items` as one batch, rendered as the engine renders them
    (its chat template, no special tokens added) and left padded: `input_ids` and
    `attention_mask` `[B, L]`, the image tensors (`pixel_values` `[B, 3, H, W]`, ...)."""
    texts = [
        processor.apply_chat_template(i.chat(), tokenize=False, add_generation_prompt=True)
        for i in items
    ]
    with _left_padding(processor.tokenizer):
        return dict(
            processor(
                text=texts,
                images=[i.picture() for i in items],
                padding=True,
                return_tensors="pt",
                add_special_tokens=False,
            )
        )


def processor_prompt_ids(processor: Any, item: ImageQuestion) -> list[int]:
    """The prompt ids `generate` is given for `item` alone (no padding)."""
    return [int(t) for t in processor_inputs(processor, [item])["input_ids"][0]]


@contextlib.contextmanager
def _left_padding(tokenizer: Any) -> Iterator[None]:
    saved = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = saved
