"""A request's samples at the gRPC edge: their finishes, and a unary call's whole results.

A request that asks for n samples of its prompt streams the events of all of
them interleaved, each tagged with its sample's index, and ends with one
finish event per sample (n in all; one when n = 1).
"""

from __future__ import annotations

import grpc

from treadle.v1 import treadle_pb2 as pb

from ..scheduler.events import FinishEvent, TokenEvent
from .metrics import ServerMetrics
from .proto_convert import finish_to_proto, logprobs_to_proto
from .status_codes import code_number, finish_code


class SampleFinishes:
    """The finish events of one request's samples, converted to the wire as they come.

    The request counts once in `treadle_errors_total` however many samples it
    has: with the code of its first sample that failed or was cancelled.
    """

    def __init__(self, metrics: ServerMetrics, samples: int) -> None:
        self._metrics = metrics
        self.left = samples  # finish events still to come
        self._counted = False  # whether the request's error is counted already

    @property
    def ended(self) -> bool:
        """Whether every sample has finished (the request has ended)."""
        return self.left <= 0

    def message(self, event: FinishEvent) -> pb.Finish:
        """The wire Finish of `event`, with the status code of its error or cancellation."""
        self.left -= 1
        code = finish_code(event)
        if code is not grpc.StatusCode.OK and not self._counted:
            self._counted = True
            self._metrics.count_error(code.name)
        return finish_to_proto(event, code_number(code))


class SampleResults:
    """The whole results of a request's samples, gathered from their interleaved events
    (for a unary Generate)."""

    def __init__(self, samples: int) -> None:
        self._samples = [pb.Sample(index=i) for i in range(samples)]
        self._text: list[list[str]] = [[] for _ in range(samples)]  # text parts per sample

    def add(self, event: TokenEvent) -> None:
        """Append a token event to its sample."""
        sample = self._samples[event.index]
        sample.token_ids.extend(event.token_ids)
        sample.logprobs.extend(logprobs_to_proto(lp) for lp in event.logprobs)
        self._text[event.index].append(event.text)

    def finish(self, index: int, finish: pb.Finish) -> None:
        """Set sample `index`'s Finish."""
        self._samples[index].finish.CopyFrom(finish)

    def response(self, request_id: str) -> pb.GenerateResponse:
        """The GenerateResponse: sample 0 in the top-level fields and, when n > 1, every
        sample in `samples` (index order). Raises AssertionError if a sample has no Finish."""
        if not all(s.HasField("finish") for s in self._samples):
            raise AssertionError("a request stream ended without the finish of every sample")
        for sample, parts in zip(self._samples, self._text, strict=True):
            sample.text = "".join(parts)
        first = self._samples[0]
        return pb.GenerateResponse(
            request_id=request_id,
            token_ids=first.token_ids,
            text=first.text,
            logprobs=first.logprobs,
            finish=first.finish,
            samples=self._samples if len(self._samples) > 1 else [],
        )
