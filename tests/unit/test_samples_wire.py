"""n samples at the edge, without a model: the check of `n`, the wire conversions both
ways, the server's unary response and metrics, the CLI's flags."""

from __future__ import annotations

import pytest

from treadle.api.checks import ParameterError, check_params
from treadle.api.limits import RequestLimits
from treadle.api.outcome import FinishReason, TokenLogprob, Usage
from treadle.api.params import GenerationParams
from treadle.client.cli import build_parser, params_from_args
from treadle.client.convert import (
    chunk_from_proto,
    finish_from_proto,
    model_info_from_proto,
    request_to_proto,
    result_from_proto,
)
from treadle.scheduler.events import CANCELLED, FinishEvent, TokenEvent
from treadle.scheduler.step_stats import StepStats
from treadle.server.metrics import ServerMetrics
from treadle.server.proto_convert import chunk_to_proto, finish_to_proto, request_from_proto
from treadle.server.samples import SampleFinishes, SampleResults
from treadle.v1 import treadle_pb2 as pb

USAGE = Usage(5, 0, 2, 0.0, 0.01, 0.1)


def token(index: int, ids: tuple[int, ...], text: str, logprob: float = -1.0) -> TokenEvent:
    logprobs = tuple(TokenLogprob(t, logprob) for t in ids)
    return TokenEvent("r", ids, text, logprobs, index=index)


def finish(index: int, reason: FinishReason = FinishReason.LENGTH) -> FinishEvent:
    return FinishEvent("r", reason, USAGE, index=index)


# -- the check ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "limits", "message"),
    [
        (0, None, "n: must be within [1, 2147483648] (got 0)"),
        (-1, RequestLimits(), "n: must be within [1, 2147483648] (got -1)"),
        (17, RequestLimits(), "n: must be within [1, 16] (got 17)"),
        (3, RequestLimits(max_samples=2), "n: must be within [1, 2] (got 3)"),
    ],
)
def test_n_out_of_range_names_the_field_and_the_limit(
    n: int, limits: RequestLimits | None, message: str
) -> None:
    with pytest.raises(ParameterError) as refused:
        check_params(GenerationParams(n=n), limits)
    assert refused.value.field == "n" and str(refused.value) == message


def test_n_within_range_passes() -> None:
    check_params(GenerationParams(n=16), RequestLimits())  # the default limit itself
    check_params(GenerationParams(n=1000))  # no limits: only n >= 1


# -- the wire, client -> server -> client ------------------------------------------------
@pytest.mark.parametrize(("n", "wire", "engine"), [(1, 1, 1), (3, 3, 3)])
def test_n_travels_from_the_sdk_to_the_engine(n: int, wire: int, engine: int) -> None:
    msg = request_to_proto(None, [5, 6], GenerationParams(n=n, seed=7))
    assert msg.n == wire
    gen = request_from_proto(msg, RequestLimits())
    assert gen.n == engine and gen.seed == 7


def test_an_unset_wire_n_is_one_sample() -> None:
    msg = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5]))
    assert request_from_proto(msg, RequestLimits()).n == 1


def test_events_keep_their_sample_index_on_the_wire_both_ways() -> None:
    chunk = chunk_to_proto(token(2, (11, 12), "ab"))
    assert chunk.index == 2
    sdk_chunk = chunk_from_proto("r", chunk)
    assert (sdk_chunk.index, sdk_chunk.token_ids, sdk_chunk.text) == (2, (11, 12), "ab")
    wire = finish_to_proto(FinishEvent("r", CANCELLED.reason, USAGE, index=1), 1)
    assert wire.index == 1
    sdk_finish = finish_from_proto("r", wire)
    assert sdk_finish.index == 1 and sdk_finish.reason is FinishReason.CANCELLED


def test_model_info_reports_max_samples_and_an_old_server_means_one() -> None:
    assert model_info_from_proto(pb.ModelInfoResponse(max_samples=4)).max_samples == 4
    assert model_info_from_proto(pb.ModelInfoResponse()).max_samples == 1


# -- the server's unary response ---------------------------------------------------------
def interleaved(results: SampleResults) -> None:
    """Two samples' events, interleaved as the engine streams them."""
    results.add(token(0, (10,), "a"))
    results.add(token(1, (20,), "x"))
    results.add(token(1, (21,), "y", logprob=-2.0))
    results.add(token(0, (11,), "b"))
    results.finish(1, finish_to_proto(finish(1, FinishReason.EOS), 0))
    results.finish(0, finish_to_proto(finish(0), 0))


def test_a_unary_response_of_two_samples_has_sample_0_on_top_and_both_below() -> None:
    results = SampleResults(2)
    interleaved(results)
    response = results.response("client-id")
    assert response.request_id == "client-id"
    assert [(s.index, s.text, list(s.token_ids)) for s in response.samples] == [
        (0, "ab", [10, 11]),
        (1, "xy", [20, 21]),
    ]
    assert [lp.logprob for lp in response.samples[1].logprobs] == [-1.0, -2.0]
    assert response.samples[1].finish.reason == pb.FINISH_REASON_EOS
    assert response.samples[1].finish.index == 1
    top = (response.text, list(response.token_ids), list(response.logprobs), response.finish)
    first = response.samples[0]
    assert top == (first.text, list(first.token_ids), list(first.logprobs), first.finish)


def test_a_unary_response_of_one_sample_has_no_samples_list() -> None:
    results = SampleResults(1)
    results.add(token(0, (10, 11), "ab"))
    results.finish(0, finish_to_proto(finish(0), 0))
    response = results.response("r")
    assert response.text == "ab" and list(response.token_ids) == [10, 11]
    assert len(response.samples) == 0


def test_a_unary_response_needs_every_samples_finish() -> None:
    results = SampleResults(2)
    results.finish(0, finish_to_proto(finish(0), 0))
    with pytest.raises(AssertionError, match="every sample"):
        results.response("r")


def test_the_sdk_reads_both_unary_shapes() -> None:
    two = SampleResults(2)
    interleaved(two)
    result = result_from_proto(two.response("r"))
    assert [(s.index, s.text, s.token_ids) for s in result.samples] == [
        (0, "ab", (10, 11)),
        (1, "xy", (20, 21)),
    ]
    assert result.samples[1].reason is FinishReason.EOS
    assert (result.text, result.token_ids, result.finish) == (
        "ab",
        (10, 11),
        result.samples[0].finish,
    )
    one = result_from_proto(
        pb.GenerateResponse(request_id="r", text="ok", token_ids=[3], finish=pb.Finish())
    )
    assert [(s.index, s.text, s.token_ids) for s in one.samples] == [(0, "ok", (3,))]


# -- counting ----------------------------------------------------------------------------
def test_a_cancelled_request_counts_one_error_however_many_samples() -> None:
    metrics = ServerMetrics("m")
    finishes = SampleFinishes(metrics, 3)
    for i in range(3):
        assert not finishes.ended
        wire = finishes.message(FinishEvent("r", CANCELLED.reason, USAGE, index=i))
        assert wire.index == i and wire.reason == pb.FINISH_REASON_CANCELLED
    assert finishes.ended
    errors = metrics.registry.get_sample_value("treadle_errors_total", {"code": "CANCELLED"})
    assert errors == 1


def test_a_request_of_three_samples_is_one_finished_request_with_every_token() -> None:
    metrics = ServerMetrics("m")
    stats = StepStats(
        step=1,
        decode_rows=3,
        prefill_rows=0,
        prefill_tokens=0,
        forward_seconds=0.0,
        process_seconds=0.0,
        step_seconds=0.01,
        running=0,
        waiting=0,
        generated_tokens=3,
        finished=[finish(i) for i in (2, 0, 1)],
    )
    metrics.observe_step(stats)
    value = metrics.registry.get_sample_value
    assert value("treadle_requests_finished_total", {"reason": "length"}) == 1
    assert value("treadle_prompt_tokens_total") == USAGE.prompt_tokens  # the prompt once
    assert value("treadle_request_latency_seconds_count") == 1
    assert value("treadle_generated_tokens_total") == 3  # every sample's


# -- the CLI -----------------------------------------------------------------------------
def test_generate_takes_n_as_a_short_or_long_flag() -> None:
    for flag in ("-n", "--n"):
        args = build_parser().parse_args(["generate", "hi", flag, "3"])
        assert params_from_args(args).n == 3
    assert params_from_args(build_parser().parse_args(["generate", "hi"])).n == 1


def test_chat_refuses_more_than_one_sample(capsys: pytest.CaptureFixture[str]) -> None:
    from treadle.client.cli import main

    with pytest.raises(SystemExit) as usage:
        main(["chat", "-n", "2"])
    assert usage.value.code == 2 and "-n/--n must be 1" in capsys.readouterr().err
