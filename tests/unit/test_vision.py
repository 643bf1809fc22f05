"""Image + text chats on tiny random vision-language models (DeepSeek-VL and LLaVA),
continuously batched with text-only requests, against the model's own `generate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import drive, run_checked, run_step, standard_attention

from bench.vlm_models import build_vlm, png
from treadle.api.images import ImagePart, TextPart
from treadle.api.limits import RequestLimits
from treadle.api.outcome import FinishReason
from treadle.api.params import ChatMessage
from treadle.scheduler.engine import Engine, EngineConfig
from treadle.scheduler.errors import ValidationError
from treadle.scheduler.generation_request import GenerationRequest
from treadle.worker.loader import LoadedModel, load_model


@pytest.fixture(scope="module", params=["deepseek_vl", "llava"])
def vlm(request: Any, smol_dir: Path, tmp_path_factory: Any) -> LoadedModel:
    folder = build_vlm(request.param, smol_dir, tmp_path_factory.mktemp(request.param))
    return load_model(str(folder), device="cpu")


def engine_for(vlm: LoadedModel, **config: Any) -> Engine:
    settings = {"max_batch_rows": 6, "max_seq_len": 256, "block_size": 4, **config}
    return Engine(vlm, EngineConfig(**settings))


def image(seed: int) -> ImagePart:
    return ImagePart(png(seed), "image/png")


def ask(rid: str, *parts: Any, max_new: int = 10) -> GenerationRequest:
    content = tuple(TextPart(p) if isinstance(p, str) else p for p in parts)
    return GenerationRequest(
        request_id=rid,
        messages=[ChatMessage("user", "", parts=content)],
        max_new_tokens=max_new,
        ignore_eos=True,
    )


def reference(vlm: LoadedModel, gen: GenerationRequest) -> list[int]:
    """What the model's own generate gives this request alone (its processor's inputs)."""
    import io

    from PIL import Image

    assert gen.messages is not None
    (message,) = gen.messages
    content = [
        {"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"}
        for p in message.parts
    ]
    pictures = [
        Image.open(io.BytesIO(p.data)).convert("RGB")
        for p in message.parts
        if isinstance(p, ImagePart)
    ]
    processor = vlm.processor
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    inputs = processor(
        text=text, images=pictures or None, return_tensors="pt", add_special_tokens=False
    )
    with standard_attention(vlm.model), torch.inference_mode():
        out = vlm.model.generate(
            **inputs,
            max_new_tokens=gen.max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return list(out[0, inputs["input_ids"].shape[1] :].tolist())


def test_image_chats_batched_with_text_equal_generate_alone(vlm: LoadedModel) -> None:
    """Staggered image and text requests share steps; prompts are prefilled in chunks of
    at most 12 tokens, so an image's tokens span several steps and chunks."""
    engine = engine_for(vlm, step_token_budget=12)
    assert engine.info.accepts_images
    gens = [
        ask("one", image(1), "What is in the picture?"),
        ask("text", "Tell me a story.", max_new=14),
        ask("two", "Compare", image(2), "with", image(3), max_new=6),
        ask("after", "Describe it.", image(4), max_new=12),
        ask("plain", "Hello there!"),
    ]
    got = drive(engine, [(i * 2, g) for i, g in enumerate(gens)])
    for gen in gens:
        assert gen.request_id is not None
        assert got[gen.request_id].tokens == reference(vlm, gen), gen.request_id
        assert got[gen.request_id].finish.reason is FinishReason.LENGTH


def test_the_prefix_cache_tells_pictures_apart(vlm: LoadedModel) -> None:
    engine = engine_for(vlm)
    first, _ = run_checked(engine, [ask("a", image(7), "What is this?")])
    same, _ = run_checked(engine, [ask("b", image(7), "What is this?")])
    other, _ = run_checked(engine, [ask("c", image(8), "What is this?")])
    prompt = same["b"].finish.usage.prompt_tokens
    assert same["b"].finish.usage.cached_prompt_tokens >= prompt - 4  # all its full blocks
    assert same["b"].tokens == first["a"].tokens
    ids = engine.factory.prompt_ids(ask("c", image(8), "What is this?"))
    first_image = ids.index(vlm.image_token_id)
    cached = other["c"].finish.usage.cached_prompt_tokens
    assert cached <= first_image  # never a block holding the other picture
    assert other["c"].tokens == reference(vlm, ask("c", image(8), "What is this?"))


def test_a_cancelled_image_request_frees_everything(vlm: LoadedModel) -> None:
    engine = engine_for(vlm, step_token_budget=8)
    events: list[Any] = []
    req = engine.factory.build(ask("x", image(5), "Hi"), "x", events.extend)
    engine.scheduler.add(req)
    plan = engine.scheduler.schedule()  # the first prefill chunk
    engine.scheduler.update(plan, engine.worker.execute(plan))
    assert req.images is not None and req.images.features is not None
    assert engine.scheduler.abort("x")
    for _ in range(5):
        if not engine.scheduler.has_work:
            break
        run_step(engine)
    assert not engine.scheduler.has_work
    engine.scheduler.check_invariants()
    assert engine.scheduler.pool.num_used == 0
    assert events[-1].reason is FinishReason.CANCELLED


@pytest.mark.parametrize(
    ("parts", "field", "why"),
    [
        ((ImagePart(b"not an image", "image/png"),), "chat.messages[0].parts[0]", "decodable"),
        ((ImagePart(b"", "image/png"),), "chat.messages[0].parts[0]", "empty"),
        ((ImagePart(png(1), "image/gif"),), "chat.messages[0].parts[0]", "MIME type"),
        ((ImagePart(png(1), "image/jpeg"),), "chat.messages[0].parts[0]", "not image/jpeg"),
        (
            (TextPart("a"), ImagePart(png(1, (300, 300)), "image/png")),
            "chat.messages[0].parts[1]",
            "90000 pixels",
        ),
        (tuple(ImagePart(png(i), "image/png") for i in range(3)), "chat", "at most 2 images"),
    ],
)
def test_bad_images_are_refused_before_queueing(
    vlm: LoadedModel, parts: tuple[Any, ...], field: str, why: str
) -> None:
    limits = RequestLimits(max_images=2, max_image_pixels=200 * 200)
    engine = engine_for(vlm, limits=limits)
    gen = GenerationRequest(messages=[ChatMessage("user", "", parts=parts)])
    with pytest.raises(ValidationError, match=why) as info:
        engine.factory.build(gen, "bad", lambda events: None)
    assert info.value.field == field


def test_images_only_in_user_messages_and_never_on_a_text_model(
    vlm: LoadedModel, tiny: LoadedModel
) -> None:
    parts = (image(1),)
    gen = GenerationRequest(messages=[ChatMessage("system", "", parts=parts)])
    with pytest.raises(ValidationError, match="images are for user messages"):
        engine_for(vlm).factory.build(gen, "sys", lambda events: None)
    text_only = Engine(tiny, EngineConfig(max_batch_rows=2, max_seq_len=128))
    assert not text_only.info.accepts_images
    gen = GenerationRequest(messages=[ChatMessage("user", "", parts=(TextPart("hi"), *parts))])
    with pytest.raises(ValidationError, match="does not accept images") as info:
        text_only.factory.build(gen, "t", lambda events: None)
    assert info.value.field == "chat.messages[0].parts[1]"
    text = GenerationRequest(messages=[ChatMessage("user", "", parts=(TextPart("hi"),))])
    plain = GenerationRequest(messages=[ChatMessage("user", "hi")])
    assert text_only.factory.prompt_ids(text) == text_only.factory.prompt_ids(plain)


async def test_image_chats_through_the_grpc_server_and_the_sdk(vlm: LoadedModel) -> None:
    """A real server on the VLM: the SDK's image() answer equals the engine's (and so
    generate's); bad images are refused with INVALID_ARGUMENT naming the part."""
    from e2e.served import start_served

    from treadle.client import AsyncClient, InvalidArgument
    from treadle.client import image as sdk_image

    served = await start_served(vlm, EngineConfig(max_batch_rows=4, max_seq_len=256))
    try:
        async with AsyncClient(served.target, timeout=60) as client:
            info = await client.model_info()
            assert info.accepts_images
            question = [
                {"role": "user", "content": [{"type": "image", "image": png(3)}, "What is it?"]}
            ]
            result = await client.generate(question, max_new_tokens=6, ignore_eos=True)
            want = reference(vlm, ask("r", image(3), "What is it?", max_new=6))
            assert list(result.token_ids) == want
            assert sdk_image(png(3)).mime_type == "image/png"
            broken = b"\x89PNG\r\n\x1a\n" + b"not really"  # a PNG signature, then nothing
            bad = [{"role": "user", "content": [{"type": "image", "image": broken}]}]
            with pytest.raises(InvalidArgument) as info_bad:
                await client.generate(bad, max_new_tokens=2)
    finally:
        await served.stop()
    assert info_bad.value.field == "chat.messages[0].parts[0]"
    assert "not a decodable image" in str(info_bad.value)  # the server decoded it
