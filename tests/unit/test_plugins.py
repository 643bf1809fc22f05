"""Plugins: the registry, the adapters of plain transformers classes, the runners, the built-ins."""

from __future__ import annotations

import importlib.metadata
import logging
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch
from helpers import decode_row
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LogitsProcessor, PreTrainedTokenizerFast, TemperatureLogitsWarper

from treadle.worker.params import SamplingParams
from treadle.worker.plan import RowInput
from treadle.worker.plugins import (
    LogitsPlugin,
    PhraseBoost,
    PluginArgumentError,
    PluginBinding,
    PluginContext,
    PluginRegistry,
    StoppingPlugin,
    default_registry,
    run_stopping_plugins,
)
from treadle.worker.plugins import registry as registry_module
from treadle.worker.plugins.builtin import PhraseBoostState, PhraseSequence
from treadle.worker.processors import LogitsPipeline

V = 32
CTX = PluginContext(tokenizer=None, vocab_size=V, eos_token_ids=(0,))


# ---------------------------------------------------------------- helpers


def make_row(
    token_ids: list[int], plugins: Sequence[PluginBinding] = (), i: int = 0, **params: Any
) -> RowInput:
    return decode_row(token_ids, SamplingParams(plugins=tuple(plugins), **params), i)


class AddOne(LogitsPlugin):
    name = "add_one"
    calls: list[int]

    def __init__(self) -> None:
        self.calls = []  # rows per call

    def bind(self, args: Mapping[str, Any], ctx: PluginContext) -> object:
        return None

    def __call__(
        self, scores: torch.Tensor, rows: Sequence[RowInput], states: Sequence[object]
    ) -> torch.Tensor:
        self.calls.append(len(rows))
        return scores + 1


class Double(AddOne):
    name = "double"

    def __call__(
        self, scores: torch.Tensor, rows: Sequence[RowInput], states: Sequence[object]
    ) -> torch.Tensor:
        return scores.mul_(2)


class Broken(AddOne):
    name = "broken"

    def __call__(
        self, scores: torch.Tensor, rows: Sequence[RowInput], states: Sequence[object]
    ) -> torch.Tensor:
        scores.fill_(123.0)  # in place, then fails: must not leak into the batch
        raise RuntimeError("boom")


class WrongShape(AddOne):
    name = "wrong_shape"

    def __call__(
        self, scores: torch.Tensor, rows: Sequence[RowInput], states: Sequence[object]
    ) -> torch.Tensor:
        return scores[:, :3]


class BoostLength(LogitsProcessor):
    """A plain transformers processor: adds `bonus` to the token id equal to the input length."""

    def __init__(self, bonus: float, fail_on: int = -1) -> None:
        self.bonus = bonus
        self.fail_on = fail_on

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        assert input_ids.shape[0] == 1 and scores.shape[0] == 1
        if int(input_ids[0, -1]) == self.fail_on:
            raise ValueError("bad last token")
        out = scores.clone()
        out[0, input_ids.shape[1]] += self.bonus
        return out


class EvenStop(StoppingPlugin):
    name = "even_stop"

    def bind(self, args: Mapping[str, Any], ctx: PluginContext) -> object:
        return None

    def __call__(
        self,
        scores: torch.Tensor,
        next_token_ids: torch.Tensor,
        rows: Sequence[RowInput],
        states: Sequence[object],
    ) -> list[bool]:
        if any(len(r.token_ids) == 13 for r in rows):
            raise RuntimeError("unlucky")
        return [int(t) % 2 == 0 for t in next_token_ids]


def small_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences: ' word' and 'word' tokenise differently."""
    corpus = [
        "the quick brown fox jumps over the lazy dog",
        "a quick brown cat sleeps",
        "the dog barks at the fox",
        "brown bread and butter",
    ] * 3
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


# ---------------------------------------------------------------- registry


def test_default_registry_has_the_builtins_and_is_a_new_object_each_time() -> None:
    first, second = default_registry(), default_registry()
    assert first.names() == ["confidence_stop", "phrase_boost", "prefix_constrained"]
    first.register("add_one", AddOne())
    assert "add_one" not in second.names()


def test_unknown_plugin_names_the_known_ones() -> None:
    with pytest.raises(PluginArgumentError) as err:
        default_registry().bind("nope", {}, CTX)
    assert str(err.value) == (
        "plugins[nope].name: unknown plugin 'nope' "
        "(known: confidence_stop, phrase_boost, prefix_constrained)"
    )


def test_register_rejects_duplicates_bad_names_and_non_plugins() -> None:
    reg = PluginRegistry()
    reg.register("add_one", AddOne())
    with pytest.raises(ValueError, match="already registered"):
        reg.register("add_one", AddOne())
    with pytest.raises(ValueError, match="letters, digits"):
        reg.register("bad name!", AddOne())
    with pytest.raises(TypeError, match="LogitsPlugin"):
        reg.register("x", object())
    with pytest.raises(TypeError, match="LogitsPlugin"):
        reg.register("y", int)


def test_a_plugin_registered_under_another_name_is_a_renamed_copy() -> None:
    plugin = AddOne()
    reg = PluginRegistry()
    reg.register("plus", plugin)
    binding = reg.bind("plus", {}, CTX)
    assert binding.name == "plus" and plugin.name == "add_one"


def test_adapter_bind_validates_arguments_through_the_constructor() -> None:
    reg = PluginRegistry()
    reg.register("temp", TemperatureLogitsWarper)
    binding = reg.bind("temp", {"temperature": 0.5}, CTX)
    assert isinstance(binding.state, TemperatureLogitsWarper)
    assert binding.state.temperature == 0.5
    assert reg.bind("temp", {"temperature": 0.5}, CTX).state is not binding.state  # per request
    with pytest.raises(PluginArgumentError) as err:
        reg.bind("temp", {"temp": 0.5}, CTX)
    assert str(err.value).startswith("plugins[temp]: ") and "'temp'" in str(err.value)
    with pytest.raises(PluginArgumentError, match=r"plugins\[temp\]: .*temperature"):
        reg.bind("temp", {"temperature": -1.0}, CTX)
    with pytest.raises(PluginArgumentError, match="must be an object"):
        reg.bind("temp", [0.5], CTX)  # type: ignore[arg-type]


def test_load_specs() -> None:
    reg = PluginRegistry()
    reg.load("transformers:TemperatureLogitsWarper")
    reg.load("warm=transformers:TemperatureLogitsWarper")
    reg.load("treadle.worker.plugins.builtin:PhraseBoost")
    assert reg.names() == ["TemperatureLogitsWarper", "phrase_boost", "warm"]
    for bad, message in [
        ("no_colon", "expected 'module:attr'"),
        ("treadle_no_such_module:x", "No module named"),
        ("transformers:NoSuchThing", "NoSuchThing"),
    ]:
        with pytest.raises(ValueError, match=message):
            reg.load(bad)


def test_load_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    eps = [
        importlib.metadata.EntryPoint(
            name="ep_temp", value="transformers:TemperatureLogitsWarper", group="g"
        ),
        importlib.metadata.EntryPoint(
            name="ep_boost", value="treadle.worker.plugins.builtin:PhraseBoost", group="g"
        ),
    ]
    seen: list[str] = []

    def fake_entry_points(*, group: str) -> list[importlib.metadata.EntryPoint]:
        seen.append(group)
        return eps

    monkeypatch.setattr(registry_module, "entry_points", fake_entry_points)
    reg = PluginRegistry()
    reg.load_entry_points("g")
    assert seen == ["g"] and reg.names() == ["ep_boost", "ep_temp"]
    assert reg.bind("ep_temp", {"temperature": 2.0}, CTX).state.temperature == 2.0  # type: ignore[attr-defined]


# ---------------------------------------------------------------- logits plugins in the pipeline


def test_adapter_runs_only_on_the_rows_that_enabled_it_with_their_own_tokens() -> None:
    reg = PluginRegistry()
    reg.register("boost_len", BoostLength)
    rows = [
        make_row([1, 2, 3], i=0),
        make_row([1, 2, 3, 4], [reg.bind("boost_len", {"bonus": 10.0}, CTX)], i=1),
        make_row([5], i=2),
        make_row([1, 2], [reg.bind("boost_len", {"bonus": -4.0}, CTX)], i=3),
    ]
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    out = LogitsPipeline(V)(logits.clone(), rows)
    assert out.errors == {}
    expected = logits.clone()
    expected[1, 4] += 10.0  # 4 tokens so far
    expected[3, 2] -= 4.0
    assert torch.equal(out.scores, expected)


def logged_failure(caplog: pytest.LogCaptureFixture, message: str, plugin: str) -> str:
    """Check `message` is the generic failure of `plugin` and return the exception text
    the server log holds under the same error id."""
    match = re.fullmatch(
        rf"plugin '{plugin}' failed \(error id ([0-9a-f]{{8}})\); see the server log", message
    )
    assert match, message
    (record,) = [r for r in caplog.records if match.group(1) in r.getMessage()]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    return str(record.exc_info[1])


def test_a_raising_adapter_fails_only_its_own_row(caplog: pytest.LogCaptureFixture) -> None:
    reg = PluginRegistry()
    reg.register("boost_len", BoostLength)
    args = {"bonus": 1.0, "fail_on": 13}
    rows = [
        make_row([1, 13], [reg.bind("boost_len", args, CTX)], i=0),
        make_row([1, 2], [reg.bind("boost_len", args, CTX)], i=1),
        make_row([1, 13], i=2, logit_bias=((0, 1.0),)),
    ]
    logits = torch.zeros(3, V)
    out = LogitsPipeline(V)(logits, rows)
    assert list(out.errors) == [0]
    assert "bad last token" in logged_failure(caplog, out.errors[0], "boost_len")
    assert out.scores[1, 2] == 1.0 and out.scores[2, 0] == 1.0


def test_a_raising_plugin_fails_only_the_rows_it_was_called_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken, add = Broken(), AddOne()
    rows = [
        make_row([1], [PluginBinding(broken, None)], i=0),
        make_row([1], [PluginBinding(add, None)], i=1),
        make_row([1], [PluginBinding(broken, None), PluginBinding(add, None)], i=2),
        make_row([1], i=3),
    ]
    logits = torch.zeros(4, V)
    out = LogitsPipeline(V)(logits.clone(), rows)
    assert sorted(out.errors) == [0, 2]
    assert logged_failure(caplog, out.errors[0], "broken") == "boom"  # not told the client
    assert "boom" not in out.errors[0] and "RuntimeError" not in out.errors[0]
    assert torch.equal(out.scores[1], torch.ones(V))
    assert torch.equal(out.scores[3], torch.zeros(V))
    assert torch.equal(out.scores[0], torch.zeros(V))  # the in-place fill did not leak
    assert add.calls == [1]  # a failed row runs no later plugin


def test_a_plugin_returning_the_wrong_shape_is_an_error_for_its_rows() -> None:
    rows = [make_row([1], [PluginBinding(WrongShape(), None)], i=0), make_row([1], i=1)]
    out = LogitsPipeline(V)(torch.zeros(2, V), rows)
    assert list(out.errors) == [0] and "(1, 3)" in out.errors[0]


def test_each_request_gets_its_plugins_in_its_own_order_one_call_per_plugin_and_depth() -> None:
    add, double = AddOne(), Double()
    rows = [
        make_row([1], [PluginBinding(add, None), PluginBinding(double, None)], i=0),
        make_row([1], [PluginBinding(double, None), PluginBinding(add, None)], i=1),
        make_row([1], [PluginBinding(add, None)], i=2),
    ]
    out = LogitsPipeline(V)(torch.ones(3, V), rows)
    assert out.scores[:, 0].tolist() == [4.0, 3.0, 2.0]  # (1+1)*2, 1*2+1, 1+1
    assert add.calls == [2, 1]  # rows 0 and 2 at depth 0, row 1 at depth 1


def test_plugins_run_after_the_processors_and_before_the_warpers() -> None:
    class Spike(AddOne):
        def __call__(
            self, scores: torch.Tensor, rows: Sequence[RowInput], states: Sequence[object]
        ) -> torch.Tensor:
            assert bool(scores[:, 5].isneginf().all())  # bad word already banned
            scores[:, 7] = 50.0
            return scores

    row = make_row(
        [1], [PluginBinding(Spike(), None)], temperature=1.0, top_k=1, bad_words_ids=((5,),)
    )
    out = LogitsPipeline(V)(torch.randn(1, V), [row])
    assert out.errors == {}
    assert out.scores[0, 7] == 50.0 and int(out.scores[0].isfinite().sum()) == 1


# ---------------------------------------------------------------- stopping plugins


def test_run_stopping_plugins_collects_stops_and_errors_per_row(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = EvenStop()
    rows = [
        make_row([1, 2], [PluginBinding(stop, None)], i=0),
        make_row([1, 2], [PluginBinding(stop, None)], i=1),
        make_row([1, 2], i=2),
        make_row(list(range(13)), [PluginBinding(stop, None)], i=3),
    ]
    scores = torch.zeros(4, V)
    stops, errors = run_stopping_plugins(scores, torch.tensor([4, 5, 6, 8]), rows[:3])
    assert stops == {0} and errors == {}
    stops, errors = run_stopping_plugins(scores, torch.tensor([4, 5, 6, 8]), rows)
    assert stops == set() and sorted(errors) == [0, 1, 3]  # one call for all its rows
    assert "unlucky" in logged_failure(caplog, errors[3], "even_stop")
    assert run_stopping_plugins(
        scores, torch.tensor([1, 2, 3, 4]), [make_row([1], i=i) for i in range(4)]
    ) == (set(), {})


# ---------------------------------------------------------------- phrase_boost


def test_phrase_boost_boosts_first_tokens_and_the_continuation_of_a_phrase_in_progress() -> None:
    tok = small_tokenizer()
    ctx = PluginContext(tokenizer=tok, vocab_size=len(tok), eos_token_ids=())
    binding = default_registry().bind(
        "phrase_boost", {"phrases": ["quick brown fox", "lazy dog"], "bias": 3.0}, ctx
    )

    def enc(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    variants = [enc(p) for p in ("quick brown fox", " quick brown fox", "lazy dog", " lazy dog")]
    firsts = {v[0] for v in variants}
    assert len(firsts) == 4  # the space variant is really different
    the = enc("the")
    mid_phrase = the + enc(" quick brown")  # ' quick brown' begun: ' fox' is next
    assert mid_phrase[-2:] == variants[1][:2]
    rows = [
        make_row(the, [binding], i=0),
        make_row(mid_phrase, [binding], i=1),
        make_row(the + variants[1], [binding], i=2),  # phrase complete: nothing more to add
        make_row(the, i=3),
    ]
    out = LogitsPipeline(len(tok))(torch.zeros(4, len(tok)), rows)
    assert out.errors == {}

    def boosted(i: int) -> set[int]:
        return set(torch.nonzero(out.scores[i]).flatten().tolist())

    assert boosted(0) == firsts
    assert boosted(1) == firsts | {variants[1][2]}
    assert boosted(2) == firsts
    assert boosted(3) == set()
    assert set(out.scores[:3][out.scores[:3] != 0].tolist()) == {3.0}  # once per token


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            {"phrases": ["a"], "bias": 500},
            r"plugins\[phrase_boost\]\.bias: .*\[-100, 100\], got 500",
        ),
        ({"phrases": ["a"], "bias": float("nan")}, r"plugins\[phrase_boost\]\.bias: "),
        ({"phrases": ["a"], "bias": "2"}, r"plugins\[phrase_boost\]\.bias: "),
        ({"phrases": []}, r"plugins\[phrase_boost\]\.phrases: must be a non-empty list"),
        ({"phrases": ["ok", ""]}, r"plugins\[phrase_boost\]\.phrases: .*non-empty strings"),
        ({"phrases": "fox"}, r"plugins\[phrase_boost\]\.phrases: "),
        ({"phrases": ["x" * 257]}, r"plugins\[phrase_boost\]\.phrases: each phrase at most 256"),
        ({"phrases": ["x"] * 65}, r"plugins\[phrase_boost\]\.phrases: at most 64 phrases, got 65"),
        ({"phrases": ["fox"], "boost": 1}, r"plugins\[phrase_boost\]: unknown argument 'boost'"),
        (
            {"phrases": ["\u00e9\u4e2d\U0001f600" * 60] * 8},
            r"plugins\[phrase_boost\]\.phrases: \d+ tokens in all .*the limit is 1024",
        ),
    ],
)
def test_phrase_boost_rejects_bad_arguments_naming_them(args: dict[str, Any], message: str) -> None:
    tok = small_tokenizer()
    with pytest.raises(PluginArgumentError, match=message):
        PhraseBoost().bind(
            args, PluginContext(tokenizer=tok, vocab_size=len(tok), eos_token_ids=())
        )


def _boosted_by_brute_force(sequences: list[tuple[int, ...]], tail: list[int]) -> set[int]:
    """The quadratic definition: every first token, and seq[done] wherever seq[:done] ends tail."""
    out = {s[0] for s in sequences}
    for seq in sequences:
        for done in range(1, min(len(seq), len(tail) + 1)):
            if tuple(tail[len(tail) - done :]) == seq[:done]:
                out.add(seq[done])
    return out


def test_phrase_boost_linear_matching_equals_the_quadratic_definition() -> None:
    rng = random.Random(7)
    for _ in range(400):
        sequences = [
            tuple(rng.choice((1, 2, 3)) for _ in range(rng.randint(1, 9)))
            for _ in range(rng.randint(1, 4))
        ]
        tail = [rng.choice((1, 2, 3)) for _ in range(rng.randint(0, 20))]
        state = PhraseBoostState(tuple(map(PhraseSequence.of, sequences)), 1.0)
        assert state.boosted(tail) == _boosted_by_brute_force(sequences, tail), (sequences, tail)


def test_phrase_boost_step_work_does_not_grow_with_the_row() -> None:
    # a periodic phrase against a long periodic row: the quadratic scan did
    # len(phrase)^2 comparisons; the automaton reads the last len(phrase) - 1 tokens once
    seq = PhraseSequence.of((5,) * 1000)
    assert seq.continuations([5] * 100_000) == {5}
    assert seq.continuations([4] * 100_000) == set()


# ---------------------------------------------------------------- confidence_stop


def _step_scores(confident: Sequence[bool]) -> torch.Tensor:
    """Scores where token 1 has probability ~1 (confident) or 1/V (not)."""
    scores = torch.zeros(len(confident), V)
    for i, c in enumerate(confident):
        if c:
            scores[i, 1] = 30.0
    return scores


def test_confidence_stop_fires_exactly_after_window_low_probability_steps() -> None:
    reg = default_registry()
    slow = reg.bind("confidence_stop", {"threshold": 0.5, "window": 3}, CTX)
    fast = reg.bind("confidence_stop", {"threshold": 0.5, "window": 1}, CTX)
    plan = [True, False, False, True, False, False, False]  # row 0's confidence per step
    tokens = [1, 2]
    for step, confident in enumerate(plan):
        rows = [make_row(tokens, [slow], i=0), make_row(tokens, [fast], i=1)]
        stops, errors = run_stopping_plugins(
            _step_scores([confident, step < 2]), torch.tensor([1, 1]), rows
        )
        assert errors == {}
        assert (0 in stops) == (step == 6), step  # three low steps in a row, the last ones
        assert (1 in stops) == (step >= 2), step  # window 1: the first low step
        tokens = [*tokens, 1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"threshold": 1.5}, r"plugins\[confidence_stop\]: threshold must be a number in \(0, 1\)"),
        ({"threshold": 0}, r"threshold must be a number in \(0, 1\), got 0"),
        ({"threshold": 0.5, "window": 0}, r"window must be an integer within \[1, 1024\]"),
        ({"threshold": 0.5, "window": 2.5}, r"window must be an integer"),
        ({"threshold": 0.5, "size": 2}, r"plugins\[confidence_stop\]: .*'size'"),
        ({}, r"plugins\[confidence_stop\]: .*'threshold'"),
    ],
)
def test_confidence_stop_rejects_bad_arguments_naming_them(
    args: dict[str, Any], message: str
) -> None:
    with pytest.raises(PluginArgumentError, match=message):
        default_registry().bind("confidence_stop", args, CTX)
