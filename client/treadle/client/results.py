"""What the SDK returns: typed events, results and model information.

A request may ask for n samples of its prompt: its events then interleave the
samples' (each event's `index` says whose), every sample ends with its own
Finish, and its Result holds every sample. A chat that offered tools gets the
calls a sample made in its Finish's `tool_calls` (`call_arguments()` parses one's
arguments); the sample's text is then what it wrote before its first call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from treadle.api.outcome import FinishReason, TokenLogprob, Usage
from treadle.api.tools import ToolCall


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """Tokens generated in one step and the text they released."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    index: int = 0  # the sample the tokens belong to (0..n-1)


@dataclass(frozen=True, slots=True)
class Finish:
    """The end of a request (of one of its samples when n > 1): a request's last
    event is the Finish of the last sample to end."""

    request_id: str
    reason: FinishReason
    usage: Usage
    stop_sequence: str = ""
    error_code: int = 0  # gRPC status code number, for errors and some cancellations
    error_message: str = ""
    index: int = 0  # the sample that ended (0..n-1)
    # the tools it called, parsed from its output; () when it made no call (the reason
    # stays EOS when the model ends after its calls)
    tool_calls: tuple[ToolCall, ...] = ()


Event = TokenChunk | Finish


@dataclass(frozen=True, slots=True)
class SampleResult:
    """One sample's whole generation."""

    index: int  # 0..n-1
    text: str
    token_ids: tuple[int, ...]
    finish: Finish
    logprobs: tuple[TokenLogprob, ...] = ()

    @property
    def reason(self) -> FinishReason:
        return self.finish.reason

    @property
    def usage(self) -> Usage:
        return self.finish.usage

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        return self.finish.tool_calls


@dataclass(frozen=True, slots=True)
class Result:
    """A whole generation: `samples` holds every sample in index order (one when n = 1);
    the text, tokens, logprobs, finish and tool calls are sample 0's, so code for one
    sample reads them as they are."""

    request_id: str
    samples: tuple[SampleResult, ...]  # at least one

    @classmethod
    def of(cls, request_id: str, samples: Sequence[SampleResult]) -> Result:
        """The Result of a request's samples (index order; at least one)."""
        return cls(request_id, tuple(samples))

    @property
    def text(self) -> str:
        return self.samples[0].text

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.samples[0].token_ids

    @property
    def finish(self) -> Finish:
        return self.samples[0].finish

    @property
    def logprobs(self) -> tuple[TokenLogprob, ...]:
        return self.samples[0].logprobs

    @property
    def reason(self) -> FinishReason:
        return self.finish.reason

    @property
    def usage(self) -> Usage:
        return self.finish.usage

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        return self.finish.tool_calls


class SampleCollector:
    """Gathers the events of a request's `samples` samples, which interleave, into its
    Result."""

    def __init__(self, samples: int = 1) -> None:
        self.samples = samples
        self._chunks: dict[int, list[TokenChunk]] = {}  # by sample index
        self._finishes: dict[int, Finish] = {}

    @property
    def done(self) -> bool:
        """Whether every sample has finished."""
        return all(i in self._finishes for i in range(self.samples))

    def add(self, event: Event) -> None:
        if isinstance(event, TokenChunk):
            self._chunks.setdefault(event.index, []).append(event)
        else:
            self._finishes[event.index] = event

    def result(self) -> Result:
        """The Result of every sample; only once `done`."""
        if not self.done:
            raise RuntimeError("a sample has not finished yet")
        samples = [self._sample(i) for i in range(self.samples)]
        return Result.of(samples[0].finish.request_id, samples)

    def _sample(self, index: int) -> SampleResult:
        chunks = self._chunks.get(index, [])
        return SampleResult(
            index=index,
            text="".join(c.text for c in chunks),
            token_ids=tuple(t for c in chunks for t in c.token_ids),
            finish=self._finishes[index],
            logprobs=tuple(lp for c in chunks for lp in c.logprobs),
        )


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The served model and the limits its server enforces."""

    model: str
    context_length: int
    max_total_tokens: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_batch_rows: int
    kv_cache_tokens: int  # positions of the KV cache pool
    default_max_new_tokens: int
    max_stop_strings: int
    max_plugins: int
    max_top_logprobs: int
    max_waiting: int
    max_request_bytes: int
    plugins: tuple[str, ...]
    has_chat_template: bool
    max_samples: int  # most samples (n) per request
    max_response_format_bytes: int  # UTF-8 bytes of a schema, regex, grammar or all choices
    max_response_format_choices: int  # entries of a choice format
    response_format_compile_seconds: float  # a format the server compiles longer is refused
    response_format_types: tuple[str, ...]  # the formats it accepts; () = no structured output
    max_tools: int  # tools of one chat; 0 = a server without tool calling
    max_tools_bytes: int  # UTF-8 bytes of a chat's tools (names, descriptions, parameters)
    accepts_images: bool  # whether the model takes images; False = a text-only model
    max_images: int  # images of one chat, all messages together
    max_image_bytes: int  # bytes of one image, encoded
    max_image_pixels: int  # pixels (width x height) of one image, decoded
    max_stop_token_sequences: int  # stop_token_sequences per request; 0 = not supported
    max_stop_token_sequence_len: int  # ids of one stop token sequence
