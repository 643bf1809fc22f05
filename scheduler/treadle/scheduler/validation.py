"""Request validation: every check, in one place, before anything is queued.

`RequestFactory.build` turns a `GenerationRequest` into a scheduler `Request`
or raises `ValidationError` whose message names the field and the limit.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ..api.checks import MAX_SEED, ParameterError, check_params, check_seconds, check_tools
from ..api.images import TextPart
from ..api.limits import RequestLimits
from ..api.params import ResponseFormat
from ..api.tools import ToolChoice
from ..worker.grammar import GrammarCompiler, GrammarError, GrammarState
from ..worker.params import LogprobsParams, SamplingParams
from ..worker.plugins import PluginRegistry
from ..worker.plugins.base import PluginArgumentError, PluginBinding, PluginContext
from .detokenizer import IncrementalDetokenizer
from .errors import ValidationError
from .generation_request import ChatMessage, GenerationRequest
from .images import decode_images
from .inputs import InputProcessor, Prompt, input_fields
from .request import EventSink, Request, StoppingParams
from .tool_format import ToolSpec, call_grammar, parse_tools
from .tool_splitter import ToolCallSplitter


@dataclass(frozen=True)
class ModelLimits:
    """What the loaded model and the KV cache allow."""

    vocab_size: int
    max_total_tokens: int  # prompt + new tokens one request may hold: min(context, KV pool)
    eos_token_ids: tuple[int, ...]
    bound: str = "context"  # what sets max_total_tokens, named in messages ("KV pool")
    max_rows: int = 2**31  # sequences running at once: bounds a request's samples
    pool_blocks: int = 2**31  # KV blocks in the pool
    block_size: int = 16  # positions per KV block


class RequestFactory:
    """Validates requests and builds the scheduler's `Request` objects."""

    def __init__(
        self,
        inputs: InputProcessor,
        model: ModelLimits,
        limits: RequestLimits,
        plugins: PluginRegistry,
        grammars: GrammarCompiler,
    ) -> None:
        self.inputs = inputs
        self.model = model
        self.limits = limits
        self.plugins = plugins
        self.grammars = grammars
        self.plugin_context = PluginContext(
            tokenizer=inputs.tokenizer,
            vocab_size=model.vocab_size,
            eos_token_ids=model.eos_token_ids,
        )

    @property
    def max_prompt_chars(self) -> int:
        return self.limits.prompt_chars(self.model.max_total_tokens)

    def build(self, gen: GenerationRequest, request_id: str, sink: EventSink) -> Request:
        """Validate `gen` and return a queued-to-be `Request`; raises ValidationError.

        With `gen.n` > 1 the request is sample 0 and holds samples 1..n-1 as
        its followers (sample i seeded with `seed + i` when a seed is given;
        each with its own plugin states, detokenizer and stop matcher).

        Everything whose cost grows with the request's size is checked against
        its limit before the costly part (tokenizing, binding plugins) runs.
        """
        check_request_id(request_id, self.limits)
        try:
            check_params(gen, self.limits)
            check_seconds("deadline", gen.deadline)  # server-side only: from the call's deadline
        except ParameterError as exc:
            raise ValidationError(exc.field, exc.detail) from exc
        self._check_priority(gen.priority)
        self._check_bad_word_chars(gen.bad_words)
        self._check_samples(gen.n)
        tools = self._tools(gen)
        prompt = self._prompt(gen, tools)
        prompt_ids = prompt.ids
        self._check_fork(gen.n, len(prompt_ids))
        max_new = self._max_new_tokens(gen, len(prompt_ids))
        stopping = self._stopping(gen, max_new)
        sampling = self._sampling(gen, stopping)
        grammar = self._grammar(gen, tools)  # compiled last: the costliest check
        calls = grammar is not None and gen.response_format is None  # tool calls are made
        now = time.monotonic()

        def sample(index: int) -> Request:
            params = sampling
            if index:  # its own seed stream and plugin states
                seed = None if gen.seed is None else (gen.seed + index) % (MAX_SEED + 1)
                params = dataclasses.replace(sampling, seed=seed, plugins=self._plugins(gen))
            return Request(
                request_id=request_id,
                prompt_ids=prompt_ids,
                sampling=params,
                stopping=stopping,
                detokenizer=IncrementalDetokenizer(
                    self.inputs.tokenizer, prompt_ids, gen.skip_special_tokens
                ),
                sink=sink,
                priority=gen.priority,
                deadline=(now + gen.deadline) if gen.deadline is not None else None,
                arrival=now,
                index=index,
                grammar=grammar.fork() if grammar is not None and index else grammar,
                calls=ToolCallSplitter() if calls else None,
                images=prompt.images,
            )

        leader = sample(0)
        leader.followers = [sample(i) for i in range(1, gen.n)]
        return leader

    def prompt_ids(self, gen: GenerationRequest) -> list[int]:
        """The input's token ids (as `InputProcessor.prompt_ids`, a chat rendered with its
        tools), after its size is checked: characters of a prompt or chat, count of token
        ids, the tools' count and bytes, the images' count, bytes and pixels."""
        return self._prompt(gen, self._tools(gen)).ids

    def _prompt(self, gen: GenerationRequest, tools: list[ToolSpec]) -> Prompt:
        chars = self.max_prompt_chars
        if gen.prompt is not None and len(gen.prompt) > chars:
            raise ValidationError(
                "prompt", f"is {len(gen.prompt)} characters; the limit is {chars}"
            )
        if gen.messages is not None:
            total = sum(_chars(m) for m in gen.messages)
            if total > chars:
                raise ValidationError("chat", f"is {total} characters in all; the limit is {chars}")
        if gen.prompt_token_ids is not None and len(gen.prompt_token_ids) >= (
            limit := self.model.max_total_tokens
        ):
            raise ValidationError("token_ids", self._too_long(len(gen.prompt_token_ids), limit))
        images = []
        if gen.messages is not None:
            images = decode_images(gen.messages, self.limits, self.inputs.accepts_images)
        return self.inputs.prompt(gen, tools, images)

    # -- pieces -----------------------------------------------------------------
    def _check_samples(self, n: int) -> None:
        if n > self.model.max_rows:
            raise ValidationError(
                "n", f"is {n} samples; the server runs at most {self.model.max_rows} at once"
            )

    def _check_fork(self, n: int, prompt_len: int) -> None:
        """The prompt's blocks plus a copy of its last one per extra sample must fit."""
        need = -(-prompt_len // self.model.block_size) + n - 1
        if n > 1 and need > self.model.pool_blocks:
            raise ValidationError(
                "n",
                f"{n} samples of a {prompt_len}-token prompt need {need} KV blocks; "
                f"the KV pool has {self.model.pool_blocks}",
            )

    def _tools(self, gen: GenerationRequest) -> list[ToolSpec]:
        """The chat's tools, checked and parsed (before anything is rendered)."""
        if not gen.tools and gen.tool_choice is None:
            return []
        if gen.messages is None:
            raise ValidationError("chat.tools", "tools and tool_choice need a chat input")
        try:
            check_tools(gen.tools, gen.tool_choice, self.limits, field="chat.tools")
        except ParameterError as exc:
            raise ValidationError(exc.field, exc.detail) from exc
        if _tool_choice(gen).type != "none":
            if gen.response_format is not None:
                raise ValidationError(
                    "response_format", "cannot be combined with tools unless tool_choice is none"
                )
            if gen.ignore_eos:
                raise ValidationError(
                    "chat.tool_choice", "cannot be combined with ignore_eos unless it is none"
                )
        return parse_tools(gen.tools, self.limits.max_tools_bytes)

    def _grammar(self, gen: GenerationRequest, tools: list[ToolSpec]) -> GrammarState | None:
        """The state at the start of the output of the response_format (its size was
        checked), or of the tool calls' grammar; None when the output is free."""
        fmt, field = gen.response_format, "response_format"
        if fmt is None and tools:
            lark = call_grammar(tools, _tool_choice(gen))
            fmt, field = (ResponseFormat("grammar", lark), "chat.tools") if lark else (None, "")
        if fmt is None:
            return None
        try:
            return self.grammars.state(fmt)
        except GrammarError as exc:
            raise ValidationError(field, str(exc)) from exc

    def _check_priority(self, priority: int) -> None:
        most = self.limits.max_priority
        if not -most <= priority <= most:
            raise ValidationError("priority", f"must be within [{-most}, {most}] (got {priority})")

    def _check_bad_word_chars(self, words: list[str]) -> None:
        most = self.limits.max_bad_word_chars
        for i, word in enumerate(words):
            if len(word) > most:
                raise ValidationError(f"bad_words[{i}]", f"is longer than {most} characters")

    def _too_long(self, prompt_len: int, limit: int) -> str:
        return (
            f"is {prompt_len} tokens; the limit is {limit - 1} "
            f"({self.model.bound} {limit} minus at least one new token)"
        )

    def _max_new_tokens(self, gen: GenerationRequest, prompt_len: int) -> int:
        limit = self.model.max_total_tokens
        if prompt_len >= limit:
            raise ValidationError(
                (input_fields(gen) or ["input"])[0], self._too_long(prompt_len, limit)
            )
        if gen.max_new_tokens is None:
            return min(self.limits.default_max_new_tokens, limit - prompt_len)
        if prompt_len + gen.max_new_tokens > limit:
            raise ValidationError(
                "max_new_tokens",
                f"{gen.max_new_tokens} plus the prompt's {prompt_len} tokens exceeds the "
                f"{self.model.bound} limit of {limit} tokens",
            )
        return gen.max_new_tokens

    def _stopping(self, gen: GenerationRequest, max_new: int) -> StoppingParams:
        self._check_vocab("stop_token_ids", gen.stop_token_ids)
        for i, seq in enumerate(gen.stop_token_sequences):
            self._check_vocab(f"stop_token_sequences[{i}]", seq)
        return StoppingParams(
            max_new_tokens=max_new,
            eos_token_ids=() if gen.ignore_eos else self.model.eos_token_ids,
            stop_token_ids=tuple(gen.stop_token_ids),
            stop_token_sequences=tuple(tuple(seq) for seq in gen.stop_token_sequences),
            stop_strings=tuple(gen.stop),
            include_stop_in_output=gen.include_stop_in_output,
            max_time=gen.max_time,
        )

    def _sampling(self, gen: GenerationRequest, stopping: StoppingParams) -> SamplingParams:
        if gen.top_k > self.model.vocab_size:
            raise ValidationError(
                "top_k", f"must be within [0, {self.model.vocab_size}] (got {gen.top_k})"
            )
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
        sequences: list[tuple[int, ...]] = []
        for i, ids in enumerate(gen.bad_words_ids):
            self._check_vocab(f"bad_words_ids[{i}]", ids)
            sequences.append(tuple(ids))
        for word in gen.bad_words:
            # The word on its own and mid-sentence (after a space) tokenize differently.
            for variant in (word, " " + word.lstrip()):
                sequences.append(tuple(self.inputs.encode(variant)))
        unique = tuple(dict.fromkeys(s for s in sequences if s))
        total, most = sum(len(s) for s in unique), self.limits.max_bad_words_tokens
        if total > most:  # each step checks every sequence against the row's tail
            raise ValidationError(
                "bad_words",
                f"the sequences are {total} tokens in all (bad_words tokenized as given and "
                f"after a space, plus bad_words_ids); the limit is {most}",
            )
        return unique

    def _logit_bias(self, gen: GenerationRequest) -> tuple[tuple[int, float], ...]:
        self._check_vocab("logit_bias", gen.logit_bias)
        return tuple(sorted(gen.logit_bias.items()))

    def _allowed(self, gen: GenerationRequest) -> tuple[int, ...]:
        self._check_vocab("allowed_token_ids", gen.allowed_token_ids)
        return tuple(sorted(set(gen.allowed_token_ids)))

    def _logprobs(self, gen: GenerationRequest) -> LogprobsParams | None:
        if not gen.logprobs and gen.top_logprobs == 0:
            return None
        return LogprobsParams(top_n=gen.top_logprobs, processed=gen.processed_logprobs)

    def _plugins(self, gen: GenerationRequest) -> tuple[PluginBinding, ...]:
        bindings = []
        for i, p in enumerate(gen.plugins):
            _check_bytes(f"plugins[{i}].name", p.name, self.limits.max_plugin_name_bytes)
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


def _tool_choice(gen: GenerationRequest) -> ToolChoice:
    """The request's tool choice: as given, else auto with tools and none without."""
    if gen.tool_choice is not None:
        return gen.tool_choice
    return ToolChoice("auto" if gen.tools else "none")


def _chars(m: ChatMessage) -> int:
    """Characters of a chat message, its calls included (bounds rendering it)."""
    calls = sum(len(c.id) + len(c.name) + len(c.arguments) for c in m.tool_calls)
    text = sum(len(p.text) for p in m.parts if isinstance(p, TextPart))
    return len(m.role) + len(m.content) + len(m.tool_call_id) + calls + text


def check_request_id(request_id: str, limits: RequestLimits) -> None:
    """A request id must be set and at most `limits.max_request_id_bytes` UTF-8 bytes
    (it is echoed in every event of its request)."""
    if not request_id:
        raise ValidationError("request_id", "must not be empty")
    _check_bytes("request_id", request_id, limits.max_request_id_bytes)


def _check_bytes(field: str, text: str, most: int) -> None:
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > most:
        raise ValidationError(field, f"is {size} bytes; the limit is {most}")
