"""Request validation: every check, in one place, before anything is queued.

`RequestFactory.build` turns a `GenerationRequest` into a scheduler `Request`
or raises `ValidationError` whose message names the field and the limit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..worker.params import LogprobsParams, SamplingParams
from ..worker.plugins import PluginRegistry
from ..worker.plugins.base import PluginArgumentError, PluginBinding, PluginContext
from .detokenizer import IncrementalDetokenizer
from .errors import ValidationError
from .generation_request import GenerationRequest
from .inputs import InputProcessor
from .limits import RequestLimits
from .request import EventSink, Request, StoppingParams

_MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class ModelLimits:
    """What the loaded model and the KV cache allow."""

    vocab_size: int
    max_total_len: int  # prompt + new tokens: min(model context, KV positions per row)
    eos_token_ids: tuple[int, ...]


class RequestFactory:
    """Validates requests and builds the scheduler's `Request` objects."""

    def __init__(
        self,
        inputs: InputProcessor,
        detok_tokenizer: Any,
        model: ModelLimits,
        limits: RequestLimits,
        plugins: PluginRegistry,
        plugin_context: PluginContext,
    ) -> None:
        self.inputs = inputs
        self.detok_tokenizer = detok_tokenizer
        self.model = model
        self.limits = limits
        self.plugins = plugins
        self.plugin_context = plugin_context

    def build(self, gen: GenerationRequest, request_id: str, sink: EventSink) -> Request:
        """Validate `gen` and return a queued-to-be `Request`; raises ValidationError."""
        self._check_request_id(request_id)
        prompt_ids = self.inputs.prompt_ids(gen)
        max_new = self._max_new_tokens(gen, len(prompt_ids))
        stopping = self._stopping(gen, max_new)
        sampling = self._sampling(gen, max_new, stopping)
        now = time.monotonic()
        return Request(
            request_id=request_id,
            prompt_ids=prompt_ids,
            sampling=sampling,
            stopping=stopping,
            detokenizer=IncrementalDetokenizer(
                self.detok_tokenizer, prompt_ids, gen.skip_special_tokens
            ),
            sink=sink,
            priority=gen.priority,
            deadline=(now + gen.deadline) if gen.deadline is not None else None,
            arrival=now,
        )

    # -- pieces -----------------------------------------------------------------
    def _check_request_id(self, request_id: str) -> None:
        if not request_id:
            raise ValidationError("request_id", "must not be empty")
        if len(request_id) > self.limits.max_request_id_chars:
            raise ValidationError(
                "request_id", f"is longer than {self.limits.max_request_id_chars} characters"
            )

    def _max_new_tokens(self, gen: GenerationRequest, prompt_len: int) -> int:
        limit = self.model.max_total_len
        if prompt_len >= limit:
            raise ValidationError(
                "prompt",
                f"is {prompt_len} tokens; the limit is {limit - 1} "
                f"(context {limit} minus at least one new token)",
            )
        if gen.max_new_tokens is None:
            return min(self.limits.default_max_new_tokens, limit - prompt_len)
        if gen.max_new_tokens < 1:
            raise ValidationError(
                "max_new_tokens", f"must be at least 1 (got {gen.max_new_tokens})"
            )
        if prompt_len + gen.max_new_tokens > limit:
            raise ValidationError(
                "max_new_tokens",
                f"{gen.max_new_tokens} plus the prompt's {prompt_len} tokens exceeds the "
                f"context limit of {limit} tokens",
            )
        return gen.max_new_tokens

    def _stopping(self, gen: GenerationRequest, max_new: int) -> StoppingParams:
        lim = self.limits
        if len(gen.stop) > lim.max_stop_strings:
            raise ValidationError("stop", f"at most {lim.max_stop_strings} stop strings")
        for i, s in enumerate(gen.stop):
            if not s:
                raise ValidationError(f"stop[{i}]", "must not be empty")
            if len(s) > lim.max_stop_string_chars:
                raise ValidationError(
                    f"stop[{i}]", f"is longer than {lim.max_stop_string_chars} characters"
                )
        if len(gen.stop_token_ids) > lim.max_stop_token_ids:
            raise ValidationError("stop_token_ids", f"at most {lim.max_stop_token_ids} ids")
        self._check_vocab("stop_token_ids", gen.stop_token_ids)
        if gen.max_time is not None and not (math.isfinite(gen.max_time) and gen.max_time > 0):
            raise ValidationError(
                "max_time", f"must be a positive number of seconds (got {gen.max_time})"
            )
        if gen.deadline is not None and not (math.isfinite(gen.deadline) and gen.deadline > 0):
            raise ValidationError(
                "deadline", f"must be a positive number of seconds (got {gen.deadline})"
            )
        return StoppingParams(
            max_new_tokens=max_new,
            eos_token_ids=() if gen.ignore_eos else self.model.eos_token_ids,
            stop_token_ids=tuple(gen.stop_token_ids),
            stop_strings=tuple(gen.stop),
            include_stop_in_output=gen.include_stop_in_output,
            max_time=gen.max_time,
        )

    def _sampling(
        self, gen: GenerationRequest, max_new: int, stopping: StoppingParams
    ) -> SamplingParams:
        _check_range("temperature", gen.temperature, 0.0, 100.0)
        _check_range("top_p", gen.top_p, 0.0, 1.0, low_open=True)
        _check_range("min_p", gen.min_p, 0.0, 1.0)
        _check_range("typical_p", gen.typical_p, 0.0, 1.0, low_open=True)
        _check_range("repetition_penalty", gen.repetition_penalty, 0.0, 100.0, low_open=True)
        _check_range("presence_penalty", gen.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", gen.frequency_penalty, -2.0, 2.0)
        _check_count("top_k", gen.top_k, 0, self.model.vocab_size)
        _check_count("no_repeat_ngram_size", gen.no_repeat_ngram_size, 0, 64)
        _check_count("min_new_tokens", gen.min_new_tokens, 0, max_new)
        if gen.seed is not None:
            _check_count("seed", gen.seed, 0, _MAX_SEED)
        return SamplingParams(
            temperature=gen.temperature,
            top_k=gen.top_k,
            top_p=gen.top_p,
            min_p=gen.min_p,
            typical_p=gen.typical_p,
            repetition_penalty=gen.repetition_penalty,
            presence_penalty=gen.presence_penalty,
            frequency_penalty=gen.frequency_penalty,
            no_repeat_ngram_size=gen.no_repeat_ngram_size,
            bad_words_ids=self._bad_words(gen),
            logit_bias=self._logit_bias(gen),
            allowed_token_ids=self._allowed(gen),
            min_new_tokens=gen.min_new_tokens,
            min_tokens_suppressed=tuple(
                sorted(set(stopping.eos_token_ids) | set(stopping.stop_token_ids))
            ),
            seed=gen.seed,
            logprobs=self._logprobs(gen),
            plugins=self._plugins(gen),
        )

    def _bad_words(self, gen: GenerationRequest) -> tuple[tuple[int, ...], ...]:
        if len(gen.bad_words) + len(gen.bad_words_ids) > self.limits.max_bad_words:
            raise ValidationError(
                "bad_words", f"at most {self.limits.max_bad_words} entries with bad_words_ids"
            )
        sequences: list[tuple[int, ...]] = []
        for i, ids in enumerate(gen.bad_words_ids):
            if not ids:
                raise ValidationError(f"bad_words_ids[{i}]", "must not be empty")
            self._check_vocab(f"bad_words_ids[{i}]", ids)
            sequences.append(tuple(ids))
        for i, word in enumerate(gen.bad_words):
            if not word:
                raise ValidationError(f"bad_words[{i}]", "must not be empty")
            # The word on its own and mid-sentence (after a space) tokenize differently.
            for variant in (word, " " + word.lstrip()):
                sequences.append(tuple(self.inputs.encode(variant)))
        return tuple(dict.fromkeys(s for s in sequences if s))

    def _logit_bias(self, gen: GenerationRequest) -> tuple[tuple[int, float], ...]:
        if len(gen.logit_bias) > self.limits.max_logit_bias:
            raise ValidationError("logit_bias", f"at most {self.limits.max_logit_bias} entries")
        self._check_vocab("logit_bias", gen.logit_bias)
        for token, bias in gen.logit_bias.items():
            _check_range(f"logit_bias[{token}]", bias, -100.0, 100.0)
        return tuple(sorted(gen.logit_bias.items()))

    def _allowed(self, gen: GenerationRequest) -> tuple[int, ...]:
        if len(gen.allowed_token_ids) > self.limits.max_allowed_token_ids:
            raise ValidationError(
                "allowed_token_ids", f"at most {self.limits.max_allowed_token_ids} ids"
            )
        self._check_vocab("allowed_token_ids", gen.allowed_token_ids)
        return tuple(sorted(set(gen.allowed_token_ids)))

    def _logprobs(self, gen: GenerationRequest) -> LogprobsParams | None:
        _check_count("top_logprobs", gen.top_logprobs, 0, self.limits.max_top_logprobs)
        if not gen.logprobs and gen.top_logprobs == 0:
            return None
        return LogprobsParams(top_n=gen.top_logprobs, processed=gen.processed_logprobs)

    def _plugins(self, gen: GenerationRequest) -> tuple[PluginBinding, ...]:
        if len(gen.plugins) > self.limits.max_plugins:
            raise ValidationError("plugins", f"at most {self.limits.max_plugins} plugins")
        bindings = []
        for i, p in enumerate(gen.plugins):
            try:
                bindings.append(self.plugins.bind(p.name, p.args, self.plugin_context))
            except PluginArgumentError as exc:
                raise _plugin_error(i, p.name, str(exc)) from exc
        return tuple(bindings)

    def _check_vocab(self, field: str, ids: Iterable[int]) -> None:
        for t in ids:
            if not 0 <= t < self.model.vocab_size:
                raise ValidationError(
                    field, f"token id {t} is outside the vocabulary [0, {self.model.vocab_size})"
                )


def _plugin_error(index: int, name: str, message: str) -> ValidationError:
    """Re-anchor a plugin's "plugins[name].arg: ..." message on the request's plugins[index]."""
    rest = message.removeprefix(f"plugins[{name}]")
    if rest == message:  # no prefix: the message is about the whole entry
        return ValidationError(f"plugins[{index}]", message)
    field, _, detail = rest.partition(": ")
    return ValidationError(f"plugins[{index}]{field}", detail)


def _check_range(
    field: str, value: float, low: float, high: float, *, low_open: bool = False
) -> None:
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValidationError(field, f"must be within {bracket}{low}, {high}] (got {value})")


def _check_count(field: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValidationError(field, f"must be within [{low}, {high}] (got {value})")
