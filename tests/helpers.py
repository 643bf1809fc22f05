"""Test helpers shared by the engine tests: drive the engine step by step, collect events."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from treadle.scheduler.engine import Engine
from treadle.scheduler.events import Event, FinishEvent, TokenEvent
from treadle.scheduler.generation_request import GenerationRequest
from treadle.worker.history import TokenHistory
from treadle.worker.loader import LoadedModel
from treadle.worker.params import SamplingParams
from treadle.worker.plan import RowInput
from treadle.worker.plugins.base import LogitsPlugin, PluginContext


@dataclass
class Collected:
    """A request's events, as a client would see them."""

    events: list[Event] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return [t for e in self.events if isinstance(e, TokenEvent) for t in e.token_ids]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TokenEvent))

    @property
    def finish(self) -> FinishEvent:
        final = [e for e in self.events if isinstance(e, FinishEvent)]
        assert len(final) == 1, f"{len(final)} terminal events"
        assert self.events[-1] is final[0], "the terminal event is not the last one"
        return final[0]

    def sample(self, index: int) -> Collected:
        """The events of one sample of a request that asked for several."""
        return Collected([e for e in self.events if e.index == index])


def drive(
    engine: Engine, arrivals: Iterable[tuple[int, GenerationRequest]], max_steps: int = 10_000
) -> dict[str, Collected]:
    """Run the engine's scheduler and worker on this thread, adding each request at its step.

    Deterministic: no step thread. Returns each request's events by id.
    """
    pending = sorted(arrivals, key=lambda a: a[0])
    out: dict[str, Collected] = {}
    step = 0
    while pending or engine.scheduler.has_work:
        assert step < max_steps, "the engine did not finish in time"
        while pending and pending[0][0] <= step:
            _, gen = pending.pop(0)
            assert gen.request_id is not None
            sink = out.setdefault(gen.request_id, Collected()).events.extend
            engine.scheduler.add(engine.factory.build(gen, gen.request_id, sink))
        run_step(engine)
        step += 1
    return out


def run_step(engine: Engine) -> None:
    """One engine step on this thread: schedule, run the plan, deliver the events."""
    plan = engine.scheduler.schedule()
    if not plan.is_empty:
        engine.scheduler.update(plan, engine.worker.execute(plan))
    for req, events in engine.scheduler.take_events():
        req.sink(events)


async def collect(engine: Engine, gen: GenerationRequest) -> Collected:
    """Run one request through the engine's async API."""
    got = Collected()
    async for event in engine.generate(gen):
        got.events.append(event)
    return got


async def collect_all(engine: Engine, gens: Iterable[GenerationRequest]) -> list[Collected]:
    return list(await asyncio.gather(*(collect(engine, g) for g in gens)))


def reference_greedy(
    model: Any, prompt_ids: list[int], max_new_tokens: int, eos: int | None
) -> list[int]:
    """What `model.generate(..., do_sample=False)` gives this request alone.

    Stops after `eos` (cut there); with `eos=None` EOS is ignored, as with `ignore_eos`.
    """
    import copy

    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = eos
    config.pad_token_id = eos if eos is not None else 0
    with standard_attention(model), torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            generation_config=config,
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    ids = out[0, len(prompt_ids) :].tolist()
    assert eos is not None or len(ids) == max_new_tokens
    return ids[: ids.index(eos) + 1] if eos is not None and eos in ids else ids


def make_tiny_model(tokenizer: Any, seed: int = 0, layers: int = 2) -> LoadedModel:
    """A tiny random llama over SmolLM2's vocabulary; seeded, so deterministic.

    The large init spreads the logits so greedy choices are not near-ties.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
        initializer_range=0.5,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name="tiny-llama",
        context_length=512,
        eos_token_ids=(2,),
        device=torch.device("cpu"),
        dtype=torch.float32,
    )


class standard_attention:
    """Run `model` with transformers' own sdpa attention inside the block (for references)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        # a vision-language model's text config is the one treadle switches
        self.saved = model.config.get_text_config()._attn_implementation

    def __enter__(self) -> Any:
        self.model.set_attn_implementation(_for_text(self.model, "sdpa"))
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.model.set_attn_implementation(_for_text(self.model, self.saved))


def _for_text(model: Any, implementation: str) -> Any:
    """What `set_attn_implementation` takes to switch the text model only."""
    if getattr(model.config, "vision_config", None) is not None:
        return {"text_config": implementation}
    return implementation


class Exploding(LogitsPlugin):
    """A logits plugin that always raises: its request must end in ERROR, alone."""

    name = "explode"

    def bind(self, args: Any, ctx: PluginContext) -> object:
        return None

    def __call__(self, scores: torch.Tensor, rows: Any, states: Any) -> torch.Tensor:
        raise RuntimeError("kaboom")


class Throttle(LogitsPlugin):
    """A logits plugin the test paces: `free` more steps run at once (None: all of them),
    then each step waits (bounded) until `release` is set. In-process servers only."""

    name = "throttle"

    def __init__(self) -> None:
        self.free: int | None = None
        self.release = threading.Event()
        self.holding = threading.Event()  # set once a step waits for `release`

    def bind(self, args: Any, ctx: PluginContext) -> object:
        return None

    def __call__(self, scores: torch.Tensor, rows: Any, states: Any) -> torch.Tensor:
        if self.free is not None:
            if self.free > 0:
                self.free -= 1
            else:
                self.holding.set()
                self.release.wait(timeout=60)
        return scores


class BanEverything(LogitsPlugin):
    """A logits plugin that rules out every token of its rows."""

    name = "ban_everything"

    def bind(self, args: Any, ctx: PluginContext) -> object:
        return None

    def __call__(self, scores: torch.Tensor, rows: Any, states: Any) -> torch.Tensor:
        return torch.full_like(scores, -torch.inf)


def decode_row(
    token_ids: list[int],
    params: SamplingParams,
    i: int = 0,
    prompt_len: int = 1,
    block_size: int = 16,
) -> RowInput:
    """Row `i` of a decode step whose history is `token_ids` (the first `prompt_len` the prompt).

    Its block table covers its tokens with blocks of its own (`block_size` positions each).
    """
    blocks = -(-len(token_ids) // block_size)
    return RowInput(
        request_id=f"r{i}",
        sample=0,
        input_ids=token_ids[-1:],
        start=len(token_ids) - 1,
        block_table=list(range(i * blocks, (i + 1) * blocks)),
        history=TokenHistory(token_ids, prompt_len),
        params=params,
    )


def pool_bytes(tiny: LoadedModel, tokens: int) -> int:
    """`--kv-cache-memory` for a pool of `tokens` positions of the tiny model (fp32)."""
    c = tiny.model.config
    head_dim = c.hidden_size // c.num_attention_heads
    return tokens * c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * 4


def run_checked(engine: Engine, gens: list[GenerationRequest]) -> tuple[dict[str, Collected], int]:
    """Run `gens` (all queued at once) on this thread, checking the engine's invariants
    (block accounting included) after every step; returns the events and the preemptions."""
    got: dict[str, Collected] = {}
    for g in gens:
        assert g.request_id is not None
        sink = got.setdefault(g.request_id, Collected()).events.extend
        engine.scheduler.add(engine.factory.build(g, g.request_id, sink))
    preempted = 0
    for _ in range(5_000):
        if not engine.scheduler.has_work:
            break
        plan = engine.scheduler.schedule()
        preempted += engine.scheduler.preempted
        if not plan.is_empty:
            engine.scheduler.update(plan, engine.worker.execute(plan))
        for req, events in engine.scheduler.take_events():
            req.sink(events)
        engine.scheduler.check_invariants()
    assert not engine.scheduler.has_work
    assert engine.scheduler.pool.num_used == 0  # every block given back
    return got, preempted
