"""Decode lanes on a tiny random llama: logits equal transformers' own whoever holds a lane.

Sequences keep their `TokenHistory` across steps as requests do, so lanes
persist; the schedules make rows join, leave, come back, move up a tier,
outgrow every lane and outnumber the lanes, over scattered and reused blocks,
and every sampled logit is compared with the cache-free forward of the same
sequence.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch
from helpers import standard_attention

from treadle.worker.decode_lanes import DecodeLanes, allocate_kv
from treadle.worker.history import TokenHistory
from treadle.worker.kv_cache import KVShape
from treadle.worker.loader import LoadedModel
from treadle.worker.model_runner import ModelRunner
from treadle.worker.params import SamplingParams
from treadle.worker.plan import RowInput, StepPlan
from treadle.worker.worker import Worker, WorkerConfig

BLOCK = 4


@dataclass
class Seq:
    """A sequence fed step by step; its history object lives as long as the sequence."""

    rid: str
    tokens: list[int]
    table: list[int]
    done: int = 0
    history: TokenHistory = field(init=False)
    logits: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.history = TokenHistory([])

    def row(self, n: int) -> RowInput:
        end = self.done + n
        while len(self.history.ids) < end:  # the request's history grows as tokens arrive
            self.history.append(self.tokens[len(self.history.ids)])
        return RowInput(
            self.rid, 0, self.tokens[self.done : end], self.done, self.table, self.history,
            SamplingParams(),
        )  # fmt: skip


def make(loaded: LoadedModel, num_blocks: int, tiers: list[tuple[int, int]]) -> ModelRunner:
    """A runner whose lanes come in `tiers`, (lanes, lane_len) each."""
    shape = KVShape.for_model(loaded.model.config, num_blocks=num_blocks, block_size=BLOCK)
    return ModelRunner(loaded, *allocate_kv(shape, tiers, loaded.dtype, loaded.device))


def assert_compact(lanes: DecodeLanes) -> None:
    """Every tier's held lanes are 0..n-1, each within its tier's length."""
    for tier in lanes.tiers:
        held = sorted(h.lane for h in tier.held.values())
        assert held == list(range(len(held)))
        assert all(h.length <= tier.lane_len for h in tier.held.values())


def step(runner: ModelRunner, plan: StepPlan, seqs: dict[str, Seq]) -> None:
    logits = runner.forward(plan)  # [N, V]
    for r, row_logits in zip(plan.sampled_rows, logits, strict=True):
        seqs[r.request_id].logits.append((r.start + len(r.input_ids) - 1, row_logits))
    for r in plan.rows:
        seqs[r.request_id].done += len(r.input_ids)


def check(loaded: LoadedModel, seq: Seq) -> None:
    with standard_attention(loaded.model), torch.inference_mode():
        want = loaded.model(torch.tensor([seq.tokens])).logits[0].float()  # [n, V]
    for position, got in seq.logits:
        torch.testing.assert_close(got, want[position], rtol=1e-4, atol=1e-3)


def scattered(num_blocks: int, seed: int) -> list[int]:
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)
    return free


@pytest.mark.parametrize("tiers", [[(3, 12)], [(3, 8), (2, 16)]], ids=["one-tier", "two-tiers"])
def test_rows_joining_leaving_outgrowing_and_outnumbering_lanes(
    tiny: LoadedModel, tiers: list[tuple[int, int]]
) -> None:
    """A few short lanes for up to six decoding rows of 20 positions: some rows read
    lanes, the rest are gathered, rows move up a tier and outgrow every lane mid-way,
    sit out steps and return, new rows take lanes that stale rows left (filled from the
    pool), and lanes move down to close the holes."""
    rng = random.Random(0)
    num_blocks = 160
    free = scattered(num_blocks, seed=0)
    runner = make(tiny, num_blocks, tiers)
    assert runner.lanes is not None
    seqs: dict[str, Seq] = {}
    waiting = [rng.randrange(3, 9) for _ in range(9)]  # prompt lengths of later arrivals
    total = 20
    lane_steps = gathered_steps = 0
    tier_steps = [0] * len(tiers)  # rows read from each tier, over the run
    for t in range(60):
        if waiting and (t % 4 == 0 or len(seqs) < 2):
            rid = f"s{len(seqs)}"
            tokens = [rng.randrange(3, 40000) for _ in range(total)]
            seqs[rid] = Seq(rid, tokens, [free.pop() for _ in range(total // BLOCK)])
            waiting.pop()
        plan = StepPlan(step=t)
        for s in seqs.values():
            if s.done >= total or rng.random() < 0.15:  # finished, or sits this step out
                continue
            if s.done == 0:
                plan.prefill.append(s.row(rng.randrange(3, 9)))
            else:
                plan.decode.append(s.row(1))
        if plan.is_empty:
            continue
        step(runner, plan, seqs)
        held = runner.lanes.held()  # which rows read lanes this step
        lane_steps += len(held)
        gathered_steps += len(plan.decode) - len(held)
        assert_compact(runner.lanes)
        for t, tier in enumerate(runner.lanes.tiers):
            tier_steps[t] += len(tier.held)
    assert lane_steps > 20 and gathered_steps > 20  # both paths ran, many times
    assert min(tier_steps) > 10  # every tier was read: rows moved up
    assert all(s.done == total for s in seqs.values())
    for s in seqs.values():
        check(tiny, s)


def test_a_lane_is_kept_only_while_its_sequence_decodes_on(tiny: LoadedModel) -> None:
    """A sequence that sits a step out loses its lane; the one above moves down into it
    (copied, not refilled) and the returning sequence is refilled from the pool."""
    free = scattered(48, seed=1)
    runner = make(tiny, 48, [(3, 16)])
    lanes = runner.lanes
    assert lanes is not None
    rng = random.Random(1)
    a, b, c = (Seq(n, [rng.randrange(3, 40000) for _ in range(12)], free[i * 3 : i * 3 + 3])
               for i, n in enumerate("abc"))  # fmt: skip
    seqs = {"a": a, "b": b, "c": c}
    step(runner, StepPlan(step=0, prefill=[a.row(5), b.row(5), c.row(5)]), seqs)
    assert not lanes.held()  # prefill rows take no lane
    step(runner, StepPlan(step=1, decode=[a.row(1), b.row(1), c.row(1)]), seqs)
    first = {h.history: h.lane for h in lanes.held()}
    assert sorted(first.values()) == [0, 1, 2]
    gone = min(first, key=lambda h: first[h])  # the sequence in lane 0
    stay = [s for s in (a, b, c) if s.history is not gone]
    step(runner, StepPlan(step=2, decode=[s.row(1) for s in stay]), seqs)
    assert {h.history for h in lanes.held()} == {s.history for s in stay}
    assert_compact(lanes)  # the top lane moved down into the hole
    step(runner, StepPlan(step=3, decode=[s.row(1) for s in (a, b, c)]), seqs)  # refilled
    assert_compact(lanes)
    for s in seqs.values():
        check(tiny, s)


def test_a_failed_step_drops_every_lane(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    free = scattered(16, seed=2)
    runner = make(tiny, 16, [(2, 16)])
    assert runner.lanes is not None
    a = Seq("a", list(range(3, 15)), free[:3])
    seqs = {"a": a}
    step(runner, StepPlan(step=0, prefill=[a.row(4)]), seqs)
    step(runner, StepPlan(step=1, decode=[a.row(1)]), seqs)
    assert len(runner.lanes.held()) == 1

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(runner.cache.arena, "write", broken)
    with pytest.raises(RuntimeError, match="injected"):
        runner.forward(StepPlan(step=2, decode=[a.row(1)]))
    assert not runner.lanes.held()  # nothing trusted after a failure
    monkeypatch.undo()
    step(runner, StepPlan(step=3, decode=[a.row(1)]), seqs)  # refilled from the pool
    check(tiny, a)


def test_lane_tiers_from_the_config(tiny: LoadedModel) -> None:
    """Two tiers of equal memory: max_batch_rows lanes of L, half as many of 2L."""
    per_token = KVShape.for_model(tiny.model.config, 1, 16).bytes_per_token(tiny.dtype)
    memory = 2 * 4 * 37 * per_token  # L = 37 positions, in whole blocks: 32
    worker = Worker(tiny, WorkerConfig(max_batch_rows=4, num_blocks=64, decode_lanes_memory=memory))
    assert worker.runner.lanes is not None
    assert [(t.lanes, t.lane_len) for t in worker.runner.lanes.tiers] == [(4, 32), (2, 64)]
    off = Worker(tiny, WorkerConfig(num_blocks=64, decode_lanes_memory=0))
    assert off.runner.lanes is None
    small = WorkerConfig(max_batch_rows=4, num_blocks=64, decode_lanes_memory=8 * 15 * per_token)
    assert Worker(tiny, small).runner.lanes is None  # under one block per lane
    capped = Worker(tiny, WorkerConfig(num_blocks=64, max_seq_len=100))  # default budget
    assert capped.runner.lanes is not None  # one tier: the sequence length caps both
    assert [t.lane_len for t in capped.runner.lanes.tiers] == [96]
    with pytest.raises(ValueError, match="decode_lanes_memory"):
        Worker(tiny, WorkerConfig(num_blocks=64, decode_lanes_memory=-1))
    with pytest.raises(ValueError, match="grow in length"):
        allocate_kv(worker.runner.lanes.tiers[0].shape, [(2, 32), (2, 32)], tiny.dtype, tiny.device)


def test_a_lane_that_does_not_end_just_before_the_row_is_refilled(tiny: LoadedModel) -> None:
    """Planning alone: a row whose lane holds other than its positions 0..start-1 (say a
    plan that fed its sequence another way) gets its lane refilled from the pool."""
    shape = KVShape.for_model(tiny.model.config, num_blocks=8, block_size=BLOCK)
    _, lanes = allocate_kv(shape, [(2, 16)], tiny.dtype, tiny.device)
    assert lanes is not None
    seq = Seq("a", list(range(3, 15)), [0, 1, 2])
    seq.done = 5
    [first] = lanes.plan([seq.row(1)])
    assert [r.start for _, r in first.fills] == [5]  # new: filled with positions 0..4
    seq.done = 6
    [again] = lanes.plan([seq.row(1)])
    assert not again.fills  # continuing: only the new token
    seq.done = 8  # positions 6 and 7 never went through the lane
    [jumped] = lanes.plan([seq.row(1)])
    assert [r.start for _, r in jumped.fills] == [8]
