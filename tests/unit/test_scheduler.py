"""The scheduler without a model: a fake worker returns hand-made tokens."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import pytest

from treadle.api.outcome import FinishReason
from treadle.scheduler.detokenizer import IncrementalDetokenizer
from treadle.scheduler.events import Event, FinishEvent, TokenEvent
from treadle.scheduler.request import Request, StoppingParams
from treadle.scheduler.scheduler import InvariantError, Scheduler, SchedulerConfig
from treadle.scheduler.step_budget import chunk_cost, chunk_fit
from treadle.worker.params import SamplingParams
from treadle.worker.plan import RowOutput, StepOutput, StepPlan

EOS = 2


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeWorker:
    """Returns, for each row, the next token of that request's script."""

    def __init__(self, scripts: dict[str, list[int]]) -> None:
        self.scripts = scripts
        self.plans: list[StepPlan] = []
        self.errors: dict[str, str] = {}

    def execute(self, plan: StepPlan) -> StepOutput:
        self.plans.append(plan)
        rows = []
        for r in plan.sampled_rows:
            if r.request_id in self.errors:
                rows.append(RowOutput(token_id=-1, error=self.errors[r.request_id]))
            else:
                rows.append(RowOutput(token_id=self.scripts[r.request_id][r.num_generated]))
        return StepOutput(rows=rows)


class Harness:
    def __init__(self, tokenizer: Any, **config: Any) -> None:
        self.tokenizer = tokenizer
        self.clock = FakeClock()
        self.scheduler = Scheduler(SchedulerConfig(**config), clock=self.clock)
        self.events: dict[str, list[Event]] = {}
        self.worker = FakeWorker({})

    def add(
        self,
        rid: str,
        script: list[int],
        prompt_len: int = 4,
        max_new: int = 100,
        priority: int = 0,
        prompt_start: int | None = None,
        **stopping: Any,
    ) -> Request:
        """Queue `rid`, whose worker answers `script`; its prompt is `prompt_len` ids counting
        up from `prompt_start` (default: a start of its own, so that prompts share no
        prefix unless a test gives them the same start)."""
        if prompt_start is None:
            prompt_start = 100 + 37 * len(self.worker.scripts) % 30_000
        self.worker.scripts[rid] = script
        prompt = list(range(prompt_start, prompt_start + prompt_len))
        req = Request(
            request_id=rid,
            prompt_ids=prompt,
            sampling=SamplingParams(),
            stopping=StoppingParams(max_new_tokens=max_new, eos_token_ids=(EOS,), **stopping),
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt),
            sink=self.events.setdefault(rid, []).extend,
            priority=priority,
            arrival=self.clock.now,
        )
        self.scheduler.add(req)
        return req

    def step(self) -> StepPlan:
        plan = self.scheduler.schedule()
        if not plan.is_empty:
            self.scheduler.update(plan, self.worker.execute(plan))
        for req, events in self.scheduler.take_events():
            req.sink(events)
        self.scheduler.check_invariants()
        self.clock.now += 0.01
        return plan

    def finish(self, rid: str) -> FinishEvent:
        final = [e for e in self.events[rid] if isinstance(e, FinishEvent)]
        assert len(final) == 1, f"{rid} has {len(final)} terminal events"
        return final[0]

    def text(self, rid: str) -> str:
        return "".join(e.text for e in self.events[rid] if isinstance(e, TokenEvent))

    def tokens(self, rid: str) -> list[int]:
        return [t for e in self.events[rid] if isinstance(e, TokenEvent) for t in e.token_ids]


@pytest.fixture
def h(tokenizer: Any) -> Harness:
    return Harness(
        tokenizer,
        max_batch_rows=2,
        max_seq_len=64,
        step_token_budget=100,
        num_blocks=64,
        block_size=4,
    )


def words(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_admission_is_bounded_by_free_rows_and_evicted_rows_are_reused(h: Harness) -> None:
    h.add("a", [10, 11], max_new=2)
    h.add("b", [20, 21, 22, 23], max_new=4)
    h.add("c", [30, 31], max_new=2)
    first = h.step()
    assert [r.request_id for r in first.prefill] == ["a", "b"]  # two rows only
    assert h.scheduler.num_waiting == 1
    a_blocks = list(h.scheduler.get("a").blocks)  # type: ignore[union-attr]
    h.step()  # a generates its 2nd token and finishes; its blocks are freed at once
    assert h.finish("a").reason is FinishReason.LENGTH
    assert all(h.scheduler.pool.ref_count[b] == 0 for b in a_blocks)
    third = h.step()
    # c is admitted into a's row in the same step that b decodes
    assert [r.request_id for r in third.decode] == ["b"]
    assert [r.request_id for r in third.prefill] == ["c"]
    assert not set(third.decode[0].block_table) & set(third.prefill[0].block_table)
    while h.scheduler.has_work:
        h.step()
    assert h.tokens("b") == [20, 21, 22, 23]
    assert h.tokens("c") == [30, 31]


def test_priority_then_arrival_order(h: Harness) -> None:
    h.add("low", [5], max_new=1, priority=0)
    h.add("high", [5], max_new=1, priority=5)
    h.add("low2", [5], max_new=1, priority=0)
    h.add("mid", [5], max_new=1, priority=1)
    admitted = []
    for _ in range(4):
        admitted += [r.request_id for r in h.step().prefill]
    assert admitted == ["high", "mid", "low", "low2"]


def test_priority_is_worth_priority_step_s_seconds_of_waiting(tokenizer: Any) -> None:
    h = Harness(tokenizer, max_batch_rows=1, max_seq_len=64, priority_step=1.0)
    h.add("busy", [5, 5, 5], max_new=3, priority=5)  # outranks everyone: never preempted
    assert [r.request_id for r in h.step().prefill] == ["busy"]  # it holds the only row meanwhile
    h.add("early", [5], max_new=1, priority=0)
    h.clock.now += 0.5  # less than one step later: one more priority overtakes
    h.add("close", [5], max_new=1, priority=1)
    h.clock.now += 1.0  # 1.5 steps after "early": one more priority is not enough
    h.add("late", [5], max_new=1, priority=1)
    admitted = []
    for _ in range(6):
        admitted += [r.request_id for r in h.step().prefill]
    assert admitted == ["close", "early", "late"]


def test_a_flood_at_the_highest_priority_cannot_starve_a_priority_0_request(
    tokenizer: Any,
) -> None:
    step_s = 0.1
    h = Harness(tokenizer, max_batch_rows=1, max_seq_len=64, priority_step=step_s)
    low = h.add("low", [5], max_new=1, priority=0)
    flood: dict[str, Request] = {}
    admitted: list[str] = []
    for i in range(1000):  # bounded: without ageing "low" would never run
        rid = f"flood{i}"  # one more each step: as fast as one row serves them
        flood[rid] = h.add(rid, [5], max_new=1, priority=10)
        admitted += [r.request_id for r in h.step().prefill]
        if "low" in admitted:
            break
    assert "low" in admitted
    assert low.admitted_at is not None
    assert low.admitted_at - low.arrival <= 10 * step_s + 0.01 + 1e-9  # one step of slack
    ahead = [flood[rid] for rid in admitted[: admitted.index("low")]]
    assert len(ahead) >= 90  # priority still counts: the flood went first for ~10 steps' worth
    assert all(r.arrival - low.arrival <= 10 * step_s + 1e-9 for r in ahead)


def test_priority_step_must_be_positive(tokenizer: Any) -> None:
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="priority_step"):
            Harness(tokenizer, priority_step=bad)


def test_a_prompt_over_the_step_budget_is_prefilled_in_chunks(tokenizer: Any) -> None:
    h = Harness(tokenizer, max_batch_rows=8, max_seq_len=64, step_token_budget=10, block_size=4)
    h.add("big", [1, 1], prompt_len=30, max_new=2)  # three steps' worth on its own
    h.add("a", [4, 4], prompt_len=6, max_new=2)
    chunks: list[tuple[int, int]] = []
    for _ in range(3):
        plan = h.step()
        assert plan.num_tokens <= 10
        (row,) = [r for r in plan.prefill if r.request_id == "big"]
        chunks.append((row.start, len(row.input_ids)))
    assert chunks == [(0, 10), (10, 10), (20, 10)]  # the whole prompt, once, in order
    assert h.tokens("big") == [1]  # its first token came with its last chunk
    assert h.tokens("a") == []  # no budget was left for it meanwhile
    while h.scheduler.has_work:
        assert h.step().num_tokens <= 10
    assert h.tokens("big") == [1, 1] and h.tokens("a") == [4, 4]


def test_a_long_prompts_later_chunks_are_shorter_for_their_attention(tokenizer: Any) -> None:
    """With an attention span, each chunk costs its tokens plus their attention to the
    positions before them: the chunks shrink along the prompt, and each step's chunk
    cost stays within the budget (at least a block of progress is always made)."""
    span, budget = 64, 24
    h = Harness(
        tokenizer, max_batch_rows=4, max_seq_len=256, step_token_budget=budget, block_size=4,
        num_blocks=128, attention_span=span,
    )  # fmt: skip
    h.add("long", [7], prompt_len=200, max_new=1)
    chunks: list[tuple[int, int]] = []
    while not h.tokens("long"):
        plan = h.step()
        (row,) = plan.prefill
        chunks.append((row.start, len(row.input_ids)))
        assert chunk_cost(row.start, len(row.input_ids), span) <= budget or len(row.input_ids) == 4
        assert len(chunks) < 100
    assert chunks[0] == (0, chunk_fit(0, budget, span)) and chunks[0][1] > 12
    sizes = [n for _, n in chunks]
    assert sizes == sorted(sizes, reverse=True) and sizes[-2] < sizes[0] // 2
    assert sum(sizes) == 200 and all(s + n == e for (s, n), (e, _) in pairwise(chunks))


def test_chunk_fit_is_the_most_tokens_within_the_budget() -> None:
    for span in (None, 1, 7, 2048):
        for start in (0, 1, 15, 500, 9000):
            for budget in (0.5, 1, 3.5, 96, 2048):
                n = chunk_fit(start, budget, span)
                assert chunk_cost(start, n, span) <= budget
                assert chunk_cost(start, n + 1, span) > budget
    assert chunk_cost(0, 80, 2048) == pytest.approx(80 + 80 * 39.5 / 2048)
    assert chunk_cost(100, 10, None) == 10


def test_decodes_never_wait_for_a_long_prompt(tokenizer: Any) -> None:
    h = Harness(tokenizer, max_batch_rows=8, max_seq_len=128, step_token_budget=8, block_size=4)
    for i in range(4):
        h.add(f"d{i}", [3] * 40, prompt_len=4, max_new=40)
    for _ in range(10):  # the four short prompts, 8 tokens a step
        h.step()
        if all(h.tokens(f"d{i}") for i in range(4)):
            break
    h.add("long", [9], prompt_len=100, max_new=1)
    for _ in range(10):
        plan = h.step()
        assert sorted(r.request_id for r in plan.decode) == ["d0", "d1", "d2", "d3"]
        assert plan.num_tokens <= 8 or len(plan.prefill) == 1
    assert h.scheduler.get("long").num_computed > 0  # type: ignore[union-attr]


def test_eos_and_stop_token_and_length(h: Harness) -> None:
    h.add("eos", [7, 8, EOS, 9], max_new=10)
    h.add("stoptok", [7, 42, 9], max_new=10, stop_token_ids=(42,))
    while h.scheduler.has_work:
        h.step()
    assert h.finish("eos").reason is FinishReason.EOS
    assert h.tokens("eos") == [7, 8, EOS]
    assert h.finish("eos").usage.generated_tokens == 3
    assert h.finish("stoptok").reason is FinishReason.STOP_TOKEN
    assert h.tokens("stoptok") == [7, 42]


def test_ignore_eos_runs_to_length(h: Harness) -> None:
    req = h.add("x", [EOS, EOS, EOS], max_new=3)
    object.__setattr__(req.stopping, "eos_token_ids", ())
    while h.scheduler.has_work:
        h.step()
    assert h.finish("x").reason is FinishReason.LENGTH
    assert h.tokens("x") == [EOS, EOS, EOS]


def test_stop_string_across_tokens_is_held_back_and_stripped(h: Harness, tokenizer: Any) -> None:
    ids = words(tokenizer, "The answer is forty two. END OF ANSWER and more")
    h.add("s", ids, max_new=len(ids), stop_strings=("END OF",))
    released: list[str] = []
    while h.scheduler.has_work:
        h.step()
        released.append(h.text("s"))
    final = h.finish("s")
    assert final.reason is FinishReason.STOP_SEQUENCE
    assert final.stop_sequence == "END OF"
    assert h.text("s") == "The answer is forty two. "
    # at no point did any part of the stop string reach the stream
    assert all("END" not in t and not t.endswith(" E") for t in released)


def test_stop_string_kept_when_asked(h: Harness, tokenizer: Any) -> None:
    ids = words(tokenizer, "one two three four")
    h.add("s", ids, max_new=len(ids), stop_strings=("two th",), include_stop_in_output=True)
    while h.scheduler.has_work:
        h.step()
    assert h.text("s") == "one two th"


def test_held_back_text_is_flushed_when_the_request_ends_otherwise(
    h: Harness, tokenizer: Any
) -> None:
    ids = words(tokenizer, "hello wor")
    h.add("s", ids, max_new=len(ids), stop_strings=("world peace",))
    while h.scheduler.has_work:
        h.step()
    assert h.finish("s").reason is FinishReason.LENGTH
    assert h.text("s") == "hello wor"


def test_max_time(h: Harness) -> None:
    h.add("t", [5] * 50, max_new=50, max_time=0.025)
    while h.scheduler.has_work:
        h.step()
    final = h.finish("t")
    assert final.reason is FinishReason.TIME_LIMIT
    assert 2 <= final.usage.generated_tokens < 50


def test_cancel_running_frees_its_row_and_others_continue(h: Harness) -> None:
    h.add("a", [1] * 10, max_new=10)
    h.add("b", [4] * 5, max_new=5)
    h.add("c", [3] * 3, max_new=3)
    h.step()
    h.step()
    assert h.scheduler.abort("a")
    plan = h.step()
    assert h.finish("a").reason is FinishReason.CANCELLED
    assert [r.request_id for r in plan.decode] == ["b"]
    assert [r.request_id for r in plan.prefill] == ["c"]  # in the row a gave back
    while h.scheduler.has_work:
        h.step()
    assert h.tokens("b") == [4] * 5 and h.tokens("c") == [3] * 3
    assert h.tokens("a") == [1, 1]
    assert not h.scheduler.abort("a")  # already gone


def test_cancel_waiting_request(h: Harness) -> None:
    h.add("a", [1] * 3, max_new=3)
    h.add("b", [1] * 3, max_new=3)
    h.add("w", [1] * 3, max_new=3)
    h.step()
    h.scheduler.abort("w")
    h.step()
    assert h.finish("w").reason is FinishReason.CANCELLED
    assert h.finish("w").usage.generated_tokens == 0
    assert h.scheduler.num_waiting == 0


def test_an_id_reused_after_a_cancel_admits_only_the_new_request(h: Harness) -> None:
    h.add("a", [1] * 3, max_new=3)
    h.add("b", [1] * 3, max_new=3)
    h.add("x", [1] * 3, max_new=3)  # ahead of w in the queue
    old = h.add("w", [1] * 3, max_new=3)
    h.step()
    h.scheduler.abort("w")
    h.step()  # the cancel takes effect; w's old entry stays behind x (lazy removal)
    new = h.add("w", [5] * 3, max_new=3, prompt_len=6)  # the same id, another prompt
    assert h.scheduler.num_waiting == 2
    admitted = []
    for _ in range(20):  # bounded: a and b finish, then x and the new w run
        admitted += [r for r in h.step().prefill if r.request_id == "w"]
        if new.status.name == "FINISHED":
            break
    assert len(admitted) == 1 and admitted[0].prompt_len == 6  # the new request's prompt
    assert old.blocks == [] and new.num_generated == 3
    assert h.tokens("w") == [5, 5, 5]


def test_deadline_cancels(h: Harness) -> None:
    req = h.add("d", [1] * 50, max_new=50)
    req.deadline = h.clock.now + 0.035
    h.scheduler._deadlines.append((req.deadline, id(req), req))
    while h.scheduler.has_work:
        h.step()
    final = h.finish("d")
    assert final.reason is FinishReason.CANCELLED
    assert final.message == "deadline exceeded"
    assert 1 <= final.usage.generated_tokens < 10


def test_row_error_ends_only_that_request(h: Harness) -> None:
    h.add("bad", [1] * 5, max_new=5)
    h.add("good", [4] * 5, max_new=5)
    h.step()
    h.worker.errors["bad"] = "plugin exploded"
    while h.scheduler.has_work:
        h.step()
    assert h.finish("bad").reason is FinishReason.ERROR
    assert h.finish("bad").message == "plugin exploded"
    assert h.finish("good").reason is FinishReason.LENGTH
    assert h.tokens("good") == [4] * 5


def test_failed_step_errors_its_rows_and_the_queue_goes_on(h: Harness) -> None:
    h.add("a", [1] * 5, max_new=5)
    h.add("b", [1] * 5, max_new=5)
    h.add("later", [3] * 2, max_new=2)
    plan = h.scheduler.schedule()
    h.scheduler.fail(plan, "internal error: boom")
    for req, events in h.scheduler.take_events():
        req.sink(events)
    while h.scheduler.has_work:
        h.step()
    assert h.finish("a").reason is FinishReason.ERROR
    assert h.finish("b").reason is FinishReason.ERROR
    assert h.finish("later").reason is FinishReason.LENGTH


def test_usage_timings(h: Harness) -> None:
    h.add("a", [1, 1, 1], max_new=3)
    while h.scheduler.has_work:
        h.step()
    usage = h.finish("a").usage
    assert usage.prompt_tokens == 4
    assert usage.generated_tokens == 3
    assert usage.queue_seconds == pytest.approx(0.0)
    assert usage.time_to_first_token_seconds == pytest.approx(0.0)
    assert usage.total_seconds == pytest.approx(0.02)


def test_prefix_cache_reuses_the_full_blocks_of_a_shared_prefix(tokenizer: Any) -> None:
    h = Harness(tokenizer, max_batch_rows=2, max_seq_len=64, num_blocks=32, block_size=4)
    first = h.add("a", [5, 5], prompt_len=10, max_new=2, prompt_start=100)
    plan = h.step()
    assert plan.prefill[0].start == 0
    a_blocks = list(first.blocks)
    second = h.add("b", [6, 6], prompt_len=12, max_new=2, prompt_start=100)  # shares 10 with a
    second.prompt_ids[10:] = [7, 8]
    second.token_ids[10:] = [7, 8]
    plan = h.step()
    # a's two full blocks (8 tokens) are b's; the shared prefix ends mid-block, so b
    # computes from token 8 on
    (pre,) = plan.prefill
    assert pre.request_id == "b" and pre.start == 8 and list(pre.input_ids) == [108, 109, 7, 8]
    assert list(pre.block_table[:2]) == a_blocks[:2]
    assert pre.block_table[2] != a_blocks[2]
    while h.scheduler.has_work:
        h.step()
    assert h.finish("b").usage.cached_prompt_tokens == 8
    assert h.finish("a").usage.cached_prompt_tokens == 0
    assert first.prompt_ids == list(range(100, 110))
    assert h.scheduler.pool.num_used == 0  # every block given back; the cached ones stay free


def test_a_prefix_ending_inside_a_cached_block_copies_that_block(tokenizer: Any) -> None:
    h = Harness(tokenizer, max_batch_rows=2, max_seq_len=64, num_blocks=16, block_size=4)
    a = h.add("a", [5, 5, 5, 5], prompt_len=10, max_new=4, prompt_start=100)
    while h.scheduler.has_work:
        h.step()  # a's blocks: 100..103, 104..107, 108 109 5 5 (the last one full at the end)
    a_blocks = list(h.worker.plans[-1].rows[0].block_table)
    b = h.add("b", [6], prompt_len=11, max_new=1, prompt_start=100)  # ends 108 109 110
    plan = h.step()
    (row,) = plan.rows
    # two full blocks shared, then a's third block gives 108 and 109: b copies it and
    # computes from position 10 on
    assert row.start == 10 and list(row.input_ids) == [110]
    assert list(row.block_table[:2]) == a_blocks[:2] and row.block_table[2] != a_blocks[2]
    assert [(c.src, c.dst) for c in plan.copies] == [(a_blocks[2], row.block_table[2])]
    while h.scheduler.has_work:
        h.step()
    assert h.finish("b").usage.cached_prompt_tokens == 10 and h.tokens("b") == [6]
    assert a.is_finished and b.is_finished and h.scheduler.pool.num_used == 0


def test_cached_blocks_survive_their_request_until_the_pool_needs_them(tokenizer: Any) -> None:
    h = Harness(tokenizer, max_batch_rows=4, max_seq_len=64, num_blocks=8, block_size=4)
    h.add("a", [5], prompt_len=9, max_new=1, prompt_start=100)
    h.step()  # a ends at once; its 2 full blocks stay cached
    assert h.scheduler.pool.num_cached == 2
    h.add("b", [5], prompt_len=9, max_new=1, prompt_start=100)
    (row,) = h.step().rows  # one token left to compute: it runs as a decode row
    assert row.start == 8  # a hit after a finished, before any eviction
    # c needs all 8 blocks and shares a's first 8 tokens
    h.add("c", [7], prompt_len=30, max_new=1, prompt_start=100)
    h.add("d", [8], prompt_len=8, max_new=1)  # waits for c, then misses: its blocks were reused
    h.scheduler.get("d").token_ids[:] = h.scheduler.get("d").prompt_ids[:] = [9] * 8  # type: ignore[union-attr]
    while h.scheduler.has_work:
        h.step()
    assert h.finish("c").usage.cached_prompt_tokens == 8
    assert h.tokens("c") == [7] and h.tokens("d") == [8]
    assert h.scheduler.pool.num_used == 0 and h.scheduler.pool.num_cached <= 8


def test_a_pool_running_dry_preempts_the_latest_request_which_resumes_where_it_was(
    tokenizer: Any,
) -> None:
    # 6 blocks of 4: two requests of 4 + 16 tokens cannot both finish without one yielding
    h = Harness(tokenizer, max_batch_rows=2, max_seq_len=24, num_blocks=6, block_size=4)
    first = h.add("first", list(range(10, 26)), prompt_len=4, max_new=16)
    h.clock.now += 0.001
    second = h.add("second", list(range(30, 46)), prompt_len=4, max_new=16)
    for _ in range(200):
        if not h.scheduler.has_work:
            break
        h.step()
    assert h.tokens("first") == list(range(10, 26))  # nothing missing, nothing twice
    assert h.tokens("second") == list(range(30, 46))
    assert second.num_preemptions >= 1 and first.num_preemptions == 0
    assert h.finish("second").reason is FinishReason.LENGTH
    assert h.scheduler.pool.num_used == 0


def test_a_higher_priority_arrival_preempts_lower_priority_work(tokenizer: Any) -> None:
    h = Harness(tokenizer, max_batch_rows=1, max_seq_len=64, num_blocks=16, block_size=4)
    low = h.add("low", [1] * 6, max_new=6)
    h.step()
    h.step()
    h.add("high", [3, 3], max_new=2, priority=3)
    plan = h.step()
    assert [r.request_id for r in plan.prefill] == ["high"]
    assert low.num_preemptions == 1 and h.scheduler.num_waiting == 1
    while h.scheduler.has_work:
        h.step()
    assert h.tokens("low") == [1] * 6 and h.tokens("high") == [3, 3]
    # low resumed from its own cached full block (its prompt) and recomputed the two
    # tokens it had generated
    resumed = [r for p in h.worker.plans for r in p.prefill if r.request_id == "low"][-1]
    assert resumed.start == 4 and list(resumed.input_ids) == [1, 1]


def test_finished_requests_leave_the_deadline_heap(h: Harness) -> None:
    long = h.add("long", [4] * 60, max_new=60)
    long.deadline = h.clock.now + 1e6
    h.scheduler._deadlines.append((long.deadline, id(long), long))
    for i in range(1000):  # each finishes long before its far deadline
        req = h.add(f"r{i}", [4], max_new=1)
        req.deadline = h.clock.now + 1e6
        h.scheduler._deadlines.append((req.deadline, id(req), req))
        h.step()
        assert len(h.scheduler._deadlines) <= 2 * len(h.scheduler.requests()) + 16
    assert h.finish("r999").reason is FinishReason.LENGTH
    while h.scheduler.has_work:
        h.step()
    assert h.scheduler._deadlines == []  # nothing in flight: no finished request is kept


def test_a_cancelled_waiting_request_leaves_the_queue_at_once(h: Harness) -> None:
    h.add("a", [1] * 50, max_new=50)
    h.add("b", [1] * 50, max_new=50)
    h.step()  # a and b hold both rows
    for i in range(1000):
        h.add(f"w{i}", [1], max_new=1)
        assert h.scheduler.abort(f"w{i}")
        assert h.scheduler.num_waiting == 0  # at once, not at the next step
        assert h.scheduler.get(f"w{i}") is None
    events = h.scheduler.take_events()
    assert len(events) == 1000
    finishes = [e[-1] for _, e in events]
    assert all(isinstance(f, FinishEvent) and f.reason is FinishReason.CANCELLED for f in finishes)
    assert len(h.scheduler.waiting._heap) <= 16  # the removed entries were pruned
    h.scheduler.check_invariants()


def test_check_invariants_catches_a_row_held_by_a_finished_request(h: Harness) -> None:
    req = h.add("a", [1] * 5, max_new=5)
    h.step()
    h.scheduler.check_invariants()
    req.finish(FinishReason.ERROR, h.clock.now)  # finished behind the scheduler's back
    with pytest.raises(InvariantError, match="a runs as"):
        h.scheduler.check_invariants()
