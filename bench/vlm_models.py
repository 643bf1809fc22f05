"""Tiny random vision-language models for the tests and bench/vlm.py, built from configs
with their processors and saved to a folder that `load_model` (and `treadle serve
--model`) loads: DeepSeek-VL (SigLIP vision tower, aligner, llama) and LLaVA (CLIP vision
tower, projector, llama), both over SmolLM2's tokenizer with the model's image token
added. Seeded, so deterministic."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

# A chat template that takes a message's content as a string or a list of parts.
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}"
    "{% if p.type == 'image' %}IMAGE{% else %}{{ p.text }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IMAGE_SIZE = 32
TEXT = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "initializer_range": 0.5,
}
VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": IMAGE_SIZE,
    "patch_size": 8,
}
IMAGE_TOKENS = (IMAGE_SIZE // 8) ** 2  # 16 per image


def patch_size(image_size: int) -> int:
    """8 for the default 32-pixel images (16 image tokens); `image_size / 24` for larger ones,
    so that they take 24 x 24 = 576 image tokens, as DeepSeek-VL 1.3B's 384-pixel ones do."""
    patch = max(8, image_size // 24)
    if image_size % patch:
        raise ValueError(f"image_size: {image_size} is not a multiple of its patch size {patch}")
    return patch


def build_vlm(
    kind: str, smol_dir: Path, out: Path, seed: int = 0, image_size: int = IMAGE_SIZE
) -> Path:
    """Write a tiny `kind` ("deepseek_vl" or "llava") model and processor to `out`, taking
    `image_size` x `image_size` images (`patch_size` pixels a patch, one token a patch)."""
    from transformers import AutoTokenizer

    token = {"deepseek_vl": "<image_placeholder>", "llava": "<image>"}[kind]
    tokenizer: Any = AutoTokenizer.from_pretrained(
        smol_dir, extra_special_tokens={"image_token": token}
    )
    image_id: int = tokenizer.convert_tokens_to_ids(token)
    patch = patch_size(image_size)
    image_tokens = (image_size // patch) ** 2
    positions = max(
        512, image_tokens + 256
    )  # TEXT's 512 positions, or an image and a chat  # an image and a chat
    text = {**TEXT, "vocab_size": len(tokenizer), "max_position_embeddings": positions}
    vision = {**VISION, "image_size": image_size, "patch_size": patch}
    torch.manual_seed(seed)
    template = TEMPLATE.replace("IMAGE", token)
    if kind == "deepseek_vl":
        from transformers import (
            DeepseekVLConfig,
            DeepseekVLForConditionalGeneration,
            DeepseekVLImageProcessor,
            DeepseekVLProcessor,
        )

        config: Any = DeepseekVLConfig(
            text_config=text, vision_config=vision, image_token_id=image_id
        )
        model: Any = DeepseekVLForConditionalGeneration(config)
        images: Any = DeepseekVLImageProcessor(size={"height": image_size, "width": image_size})
        processor: Any = DeepseekVLProcessor(
            image_processor=images,
            tokenizer=tokenizer,
            num_image_tokens=image_tokens,
            chat_template=template,
        )
    else:
        from transformers import (
            CLIPImageProcessor,
            LlavaConfig,
            LlavaForConditionalGeneration,
            LlavaProcessor,
        )

        clip = {**vision, "model_type": "clip_vision_model", "projection_dim": 32}
        config = LlavaConfig(text_config=text, vision_config=clip, image_token_index=image_id)
        model = LlavaForConditionalGeneration(config)
        size = {"shortest_edge": image_size}
        crop = {"height": image_size, "width": image_size}
        images = CLIPImageProcessor(size=size, crop_size=crop)
        processor = LlavaProcessor(
            image_processor=images,
            tokenizer=tokenizer,
            patch_size=patch,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS, which "default" drops
            chat_template=template,
        )
    model.eval().save_pretrained(out)
    processor.save_pretrained(out)
    return out


def png(seed: int, size: tuple[int, int] = (40, 48)) -> bytes:
    """A random RGB picture, PNG-encoded."""
    from PIL import Image

    pixels = (np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
