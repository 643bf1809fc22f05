"""The paged worker on a tiny random llama: its logits equal transformers' own, cache-free.

Every check compares the runner's next-token logits with the plain
`model(input_ids).logits` of the same sequence (no cache, transformers' sdpa
attention), in fp32. Block tables are drawn from a shuffled pool, and blocks
are reused across cases with stale contents, so a wrong gather, write or mask
shows as different logits.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
import torch
from helpers import standard_attention

from treadle.worker.history import TokenHistory
from treadle.worker.kv_cache import KVShape, PagedKVCache
from treadle.worker.loader import LoadedModel
from treadle.worker.model_runner import ModelRunner
from treadle.worker.params import SamplingParams
from treadle.worker.plan import BlockCopy, RowInput, StepPlan
from treadle.worker.worker import Worker, WorkerConfig

GREEDY = SamplingParams()


def reference(loaded: LoadedModel, token_ids: Sequence[int]) -> torch.Tensor:
    """transformers' own logits `[n, V]` for the whole sequence, without any cache."""
    with standard_attention(loaded.model), torch.inference_mode():
        return loaded.model(torch.tensor([list(token_ids)])).logits[0].float()


def assert_logits(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)  # fp32, other summation orders


def make_runner(loaded: LoadedModel, num_blocks: int, block_size: int) -> ModelRunner:
    shape = KVShape.for_model(loaded.model.config, num_blocks=num_blocks, block_size=block_size)
    return ModelRunner(loaded, PagedKVCache.create(shape, loaded.dtype, loaded.device))


class Blocks:
    """Hands out the pool's block ids in a shuffled order, so tables are scattered."""

    def __init__(self, num_blocks: int, seed: int) -> None:
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)

    def take(self, n: int) -> list[int]:
        taken, self.free = self.free[:n], self.free[n:]
        assert len(taken) == n, "the test's pool is too small"
        return taken


@dataclass
class Seq:
    """A sequence fed to the runner step by step; `done` tokens are in its blocks."""

    rid: str
    tokens: list[int]
    table: list[int]
    done: int = 0
    logits: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (position, [V])

    def row(self, n: int, known: int | None = None) -> RowInput:
        """A row feeding the next `n` tokens; it samples unless `known` tokens lie beyond."""
        end = self.done + n
        return RowInput(
            request_id=self.rid,
            sample=0,
            input_ids=self.tokens[self.done : end],
            start=self.done,
            block_table=self.table,
            history=TokenHistory(self.tokens[: known or end]),
            params=GREEDY,
        )


def run(runner: ModelRunner, plan: StepPlan, seqs: dict[str, Seq]) -> torch.Tensor:
    """Run one step; record each sampling row's logits on its Seq and advance every Seq."""
    logits = runner.forward(plan)  # [N, V]
    assert logits.shape[0] == len(plan.sampled_rows)
    for r, row_logits in zip(plan.sampled_rows, logits, strict=True):
        seqs[r.request_id].logits.append((r.start + len(r.input_ids) - 1, row_logits))
    for r in plan.rows:
        seqs[r.request_id].done += len(r.input_ids)
    return logits


def check_against_reference(loaded: LoadedModel, seq: Seq) -> None:
    assert seq.logits, "nothing was sampled"
    want = reference(loaded, seq.tokens)  # [n, V]
    for position, got in seq.logits:
        assert_logits(got, want[position])


def random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 40000) for _ in range(n)]


def test_whole_prompt_equals_transformers(tiny: LoadedModel) -> None:
    rng = random.Random(0)
    runner = make_runner(tiny, num_blocks=32, block_size=4)
    seq = Seq("a", random_tokens(rng, 41), Blocks(32, seed=0).take(11))
    run(runner, StepPlan(step=0, prefill=[seq.row(41)]), {"a": seq})
    check_against_reference(tiny, seq)


@pytest.mark.parametrize("block_size", [4, 16])
def test_prompt_split_at_every_position_equals_transformers(
    tiny: LoadedModel, block_size: int
) -> None:
    """Two chunks, the first ending at every position (mid-block and on block edges);
    each chunk samples, so the logits at both chunk ends are checked."""
    rng = random.Random(1)
    prompt = random_tokens(rng, 40)
    want = reference(tiny, prompt)
    runner = make_runner(tiny, num_blocks=64, block_size=block_size)
    blocks = Blocks(64, seed=block_size)
    for split in range(1, len(prompt)):
        seq = Seq("a", prompt, blocks.take(-(-len(prompt) // block_size)))
        blocks.free.extend(seq.table)  # reused, stale, by later splits
        for n in (split, len(prompt) - split):
            run(runner, StepPlan(step=split, prefill=[seq.row(n)]), {"a": seq})
        (first, got_first), (last, got_last) = seq.logits
        assert (first, last) == (split - 1, len(prompt) - 1)
        assert_logits(got_first, want[first])
        assert_logits(got_last, want[last])


@pytest.mark.parametrize("chunk", [1, 3, 4, 5, 16, 17])
def test_prompt_in_equal_chunks_equals_transformers(tiny: LoadedModel, chunk: int) -> None:
    """Many chunks, each starting where the last ended (start > 0, mid-block or not)."""
    rng = random.Random(2)
    seq = Seq("a", random_tokens(rng, 38), Blocks(16, seed=chunk).take(10))
    runner = make_runner(tiny, num_blocks=16, block_size=4)
    step = 0
    while seq.done < len(seq.tokens):
        n = min(chunk, len(seq.tokens) - seq.done)
        run(runner, StepPlan(step=step, prefill=[seq.row(n)]), {"a": seq})
        step += 1
    assert len(seq.logits) == -(-38 // chunk)
    check_against_reference(tiny, seq)


def test_decode_steps_after_the_prompt_equal_transformers(tiny: LoadedModel) -> None:
    rng = random.Random(3)
    prompt, extra = random_tokens(rng, 13), random_tokens(rng, 14)
    seq = Seq("a", prompt + extra, Blocks(16, seed=3).take(7))
    runner = make_runner(tiny, num_blocks=16, block_size=4)
    run(runner, StepPlan(step=0, prefill=[seq.row(len(prompt), known=len(prompt))]), {"a": seq})
    for step in range(1, len(extra) + 1):
        run(runner, StepPlan(step=step, decode=[seq.row(1)]), {"a": seq})
    assert [p for p, _ in seq.logits] == list(range(12, 27))
    check_against_reference(tiny, seq)


def test_many_sequences_per_step_with_scattered_blocks_equal_transformers(
    tiny: LoadedModel,
) -> None:
    """Six sequences fed by a random schedule: each step mixes decode rows (one token)
    with prefill chunks that start at 0 or further on, over interleaved block tables."""
    rng = random.Random(4)
    block_size, num_blocks = 4, 96
    blocks = Blocks(num_blocks, seed=4)
    seqs: dict[str, Seq] = {}
    for i, n in enumerate([1, 5, 9, 23, 31, 44]):
        seqs[f"s{i}"] = Seq(f"s{i}", random_tokens(rng, n), blocks.take(-(-n // block_size)))
    runner = make_runner(tiny, num_blocks=num_blocks, block_size=block_size)
    plans: list[StepPlan] = []
    while any(s.done < len(s.tokens) for s in seqs.values()):
        plan = StepPlan(step=len(plans))
        for s in rng.sample(list(seqs.values()), len(seqs)):  # rows in a random order
            left = len(s.tokens) - s.done
            if left == 0:
                continue
            n = min(left, rng.choice([1, 1, 2, 3, 6, 11]))
            (plan.decode if n == 1 and s.done > 0 else plan.prefill).append(s.row(n))
        run(runner, plan, seqs)
        plans.append(plan)
    mixed = [p for p in plans if len(p.decode) > 1 and any(r.start > 0 for r in p.prefill)]
    assert len(mixed) >= 3  # the schedule does mix batched decode with continued chunks
    for s in seqs.values():
        check_against_reference(tiny, s)


def test_block_copies_apply_before_the_forward(tiny: LoadedModel) -> None:
    """A fork shares a's first block, copies its full second block and its partial third
    (copy on write); then both continue differently, in the same step, and later."""
    rng = random.Random(5)
    prompt = random_tokens(rng, 10)  # blocks of 4: two full, one holding 2 positions
    blocks = Blocks(16, seed=5)
    a = Seq("a", prompt + random_tokens(rng, 3), blocks.take(4))
    b = Seq("b", prompt + random_tokens(rng, 3), [a.table[0], *blocks.take(3)])
    seqs = {"a": a, "b": b}
    runner = make_runner(tiny, num_blocks=16, block_size=4)
    run(runner, StepPlan(step=0, prefill=[a.row(10)]), seqs)
    b.done = 10  # b's first 10 positions are a's KV, through the copies
    copies = [BlockCopy(a.table[1], b.table[1]), BlockCopy(a.table[2], b.table[2])]
    for step in range(1, 4):
        run(runner, StepPlan(step=step, decode=[a.row(1), b.row(1)], copies=copies), seqs)
        copies = []
    assert [p for p, _ in b.logits] == [10, 11, 12]
    check_against_reference(tiny, a)
    check_against_reference(tiny, b)


def test_a_step_of_only_mid_prompt_chunks_returns_no_rows(tiny: LoadedModel) -> None:
    rng = random.Random(6)
    worker = Worker(tiny, WorkerConfig(num_blocks=32, block_size=4))
    blocks = Blocks(32, seed=6)
    a = Seq("a", random_tokens(rng, 19), blocks.take(6))
    b = Seq("b", random_tokens(rng, 7), blocks.take(3))
    seqs = {"a": a, "b": b}
    first = StepPlan(step=0, prefill=[a.row(9, known=19), b.row(5, known=7)])
    assert worker.execute(first).rows == []
    for r in first.rows:
        seqs[r.request_id].done += len(r.input_ids)
    # b finishes its prompt and samples; a feeds another chunk and does not
    second = StepPlan(step=1, prefill=[a.row(6, known=19), b.row(2)])
    out = worker.execute(second)
    assert [r.request_id for r in second.sampled_rows] == ["b"]
    assert len(out.rows) == 1
    assert out.rows[0].token_id == int(reference(tiny, b.tokens)[-1].argmax())
    a.done, b.done = 15, 7
    b.tokens.append(out.rows[0].token_id)
    third = StepPlan(step=2, decode=[b.row(1)], prefill=[a.row(4)])
    out = worker.execute(third)
    assert [r.token_id for r in out.rows] == [
        int(reference(tiny, b.tokens)[-1].argmax()),
        int(reference(tiny, a.tokens)[-1].argmax()),
    ]


def test_plans_that_break_the_kv_contract_raise(tiny: LoadedModel) -> None:
    worker = Worker(tiny, WorkerConfig(num_blocks=8, block_size=4))
    tokens = list(range(3, 12))  # 9 tokens: 3 blocks of 4

    def plan(table: list[int], copies: Sequence[BlockCopy] = ()) -> StepPlan:
        row = Seq("r1", tokens, table).row(9)
        return StepPlan(step=7, prefill=[row], copies=list(copies))

    for bad, problem in [
        (plan([0, 1]), "2 blocks cover < 9 positions"),
        (plan([0, 1, 8]), "outside the pool"),
        (plan([0, -1, 2]), "outside the pool"),
    ]:
        with pytest.raises(ValueError, match=rf"step 7, request r1: .*{problem}"):
            worker.execute(bad)
    with pytest.raises(ValueError, match=r"step 7: .*outside the pool"):
        worker.execute(plan([0, 1, 2], [BlockCopy(3, 8)]))
    decode = StepPlan(step=7, decode=[Seq("r1", tokens, [0, 1, 2]).row(2)])
    with pytest.raises(ValueError, match=r"step 7, request r1: 2 input tokens in a decode row"):
        worker.execute(decode)
    assert len(worker.execute(plan([0, 1, 2, 5])).rows) == 1  # a longer table is fine


def test_pool_and_sequence_sizes_from_the_config(tiny: LoadedModel) -> None:
    per_block = KVShape.for_model(tiny.model.config, 1, 4).bytes_per_block(tiny.dtype)
    assert per_block == 2 * 2 * 2 * 16 * 4 * 4  # layers x K,V x kv heads x head dim x fp32 x bs
    worker = Worker(tiny, WorkerConfig(kv_cache_memory=100 * per_block + 1, block_size=4))
    assert (worker.num_blocks, worker.block_size) == (100, 4)
    assert worker.cache.nbytes == 100 * per_block
    assert worker.max_seq_len == tiny.context_length  # no cap below the model's context
    assert Worker(tiny, WorkerConfig(max_seq_len=100, num_blocks=3)).max_seq_len == 100
    assert Worker(tiny, WorkerConfig(max_seq_len=10**6, num_blocks=3)).max_seq_len == 512
    # the default: 1 GiB on the CPU, but no more than max_batch_rows full sequences fill
    per_block_16 = KVShape.for_model(tiny.model.config, 1, 16).bytes_per_block(tiny.dtype)
    default = Worker(tiny, WorkerConfig())
    assert default.num_blocks == 64 * 512 // 16  # the tiny model: 16 MiB would hold 64 x 512
    assert default.num_blocks < 2**30 // per_block_16
    with pytest.raises(ValueError, match="kv_cache_memory"):
        Worker(tiny, WorkerConfig(kv_cache_memory=per_block - 1, block_size=4))
