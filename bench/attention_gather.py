"""Microbenchmark: one decode step's KV gather + SDPA, slot rows against paged layouts.

    python bench/attention_gather.py [--rows 64] [--lengths 85 1000] [--repeats 3]

SmolLM2-135M's attention shape (30 layers, 9 query heads, 3 KV heads, head
dim 64, fp32), D decode rows whose lengths reach K, block size 16, blocks
scattered at random through the pool (a fragmented pool). Each variant gets
the decode rows' K/V into `[D, KVH, K, Dh]` form and runs one batched SDPA
with GQA folding and a length mask, as `attention.py` does:

- slot rows: the wave-1 baseline, a view of `[R, KVH, max_len, Dh]` (no copy);
- token index_select: token-major slots `[S, KVH, Dh]`, one index per position,
  into a new tensor, then into a reused buffer (`out=`); the result is strided
  (`[D, K, KVH, Dh]` transposed);
- block advanced indexing: `[blocks, bs, KVH, Dh][table]` (strided result);
- head-blocked index_select: `[blocks, KVH, bs, Dh]` seen as
  `[blocks * KVH, bs * Dh]`, one index per block and head, so the result is
  contiguous `[D, KVH, K, Dh]`; into a new tensor, then through
  `PagedKVCache.gather` (treadle's code: a reused scratch buffer).

Layers cycle through 4 separate buffers (each bigger than the CPU caches at
large K), so reads come from memory as in a real step; a step is 30 layers.
Prints ms per step for the gather alone and for gather + SDPA, best of
`--repeats`. About a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `treadle.worker` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "worker"))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "api"))

from treadle.worker.kv_cache import KVShape, PagedKVCache

LAYERS = 30  # SmolLM2-135M
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
BLOCK = 16
BUFFERS = 4  # distinct layer buffers cycled through (defeats the CPU caches)

Gather = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # layer -> k, v [D, KVH, K, Dh]


def slot_rows(d: int, k: int) -> Gather:
    keys = [torch.randn(d, KV_HEADS, k, HEAD_DIM) for _ in range(BUFFERS)]  # [R, KVH, max, Dh]
    values = [torch.randn_like(t) for t in keys]

    def gather(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return keys[layer][:d, :, :k], values[layer][:d, :, :k]

    return gather


class Pool:
    """Random block tables over a pool of exactly the blocks the D rows need."""

    def __init__(self, d: int, k: int) -> None:
        self.d, self.k = d, k
        self.nb = -(-k // BLOCK)  # blocks per row
        self.num_blocks = d * self.nb
        self.slots = self.num_blocks * BLOCK
        self.table = torch.randperm(self.num_blocks).view(d, self.nb)  # [D, nb]
        pos = torch.arange(k)  # [K]
        slot = self.table[:, pos // BLOCK] * BLOCK + pos % BLOCK  # [D, K]
        self.token_index = slot.reshape(-1)  # [D*K]

    def buffers(self, shape: tuple[int, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        keys = [torch.randn(shape) for _ in range(BUFFERS)]
        return keys, [torch.randn_like(t) for t in keys]


def token_index_select(p: Pool, reuse: bool) -> Gather:
    keys, values = p.buffers((p.slots, KV_HEADS, HEAD_DIM))  # [S, KVH, Dh]
    outs = [torch.empty(p.d * p.k, KV_HEADS, HEAD_DIM) for _ in range(2)]  # [D*K, KVH, Dh]

    def one(buf: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if reuse:
            g = torch.index_select(buf, 0, p.token_index, out=out)
        else:
            g = buf.index_select(0, p.token_index)  # [D*K, KVH, Dh]
        return g.view(p.d, p.k, KV_HEADS, HEAD_DIM).transpose(1, 2)  # [D, KVH, K, Dh]

    return lambda layer: (one(keys[layer], outs[0]), one(values[layer], outs[1]))


def block_advanced_indexing(p: Pool) -> Gather:
    keys, values = p.buffers((p.num_blocks, BLOCK, KV_HEADS, HEAD_DIM))  # [blocks, bs, KVH, Dh]

    def one(buf: torch.Tensor) -> torch.Tensor:
        g = buf[p.table]  # [D, nb, bs, KVH, Dh]
        return g.view(p.d, p.nb * BLOCK, KV_HEADS, HEAD_DIM)[:, : p.k].transpose(1, 2)

    return lambda layer: (one(keys[layer]), one(values[layer]))


def head_blocked_new_tensor(p: Pool) -> Gather:
    keys, values = p.buffers((p.num_blocks * KV_HEADS, BLOCK * HEAD_DIM))  # [blocks*KVH, bs*Dh]
    heads = torch.arange(KV_HEADS)[None, :, None]  # [1, KVH, 1]
    index = (p.table[:, None, :] * KV_HEADS + heads).reshape(-1)  # [D*KVH*nb]

    def one(buf: torch.Tensor) -> torch.Tensor:
        g = buf.index_select(0, index)  # [D*KVH*nb, bs*Dh]
        return g.view(p.d, KV_HEADS, p.nb * BLOCK, HEAD_DIM)[:, :, : p.k]  # [D, KVH, K, Dh]

    return lambda layer: (one(keys[layer]), one(values[layer]))


def head_blocked_cache(p: Pool) -> Gather:
    """treadle's own `PagedKVCache.gather` (head-blocked layout, scratch buffer)."""
    shape = KVShape(BUFFERS, KV_HEADS, HEAD_DIM, num_blocks=p.num_blocks, block_size=BLOCK)
    cache = PagedKVCache.create(shape, torch.float32, torch.device("cpu"))
    cache.arena.buffer.normal_()
    index = cache.block_rows(p.table).reshape(-1)  # [2*D*KVH*nb]: keys, then values
    return lambda layer: cache.gather(layer, index, p.d, p.k)


VARIANTS: dict[str, Callable[[Pool], Gather]] = {
    "slot rows (baseline)": lambda p: slot_rows(p.d, p.k),
    "token index_select, new": lambda p: token_index_select(p, reuse=False),
    "token index_select, out=": lambda p: token_index_select(p, reuse=True),
    "block advanced indexing": block_advanced_indexing,
    "head-blocked, new": head_blocked_new_tensor,
    "head-blocked, PagedKVCache": head_blocked_cache,
}


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> None:
    F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # q [D, KVH, rep, Dh]


def time_step(fn: Callable[[int], object], repeats: int) -> float:
    """Best of `repeats` of a 30-layer step, in ms."""
    for layer in range(BUFFERS):  # warm up: touch every buffer once
        fn(layer)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for layer in range(LAYERS):
            fn(layer % BUFFERS)
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[85, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    d = args.rows
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; D={d}, block {BLOCK}")
    print(f"{'K':>5}  {'variant':<28} {'gather ms':>10} {'+SDPA ms':>10}")
    for k in args.lengths:
        pool = Pool(d, k)
        q = torch.randn(d, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)  # [D, KVH, rep, Dh]
        lengths = torch.randint(k // 2, k + 1, (d,))  # [D]
        lengths[0] = k
        mask = (torch.arange(k)[None, :] < lengths[:, None]).view(d, 1, 1, k)  # [D, 1, 1, K]
        for name, build in VARIANTS.items():
            gather = build(pool)

            def step(layer: int, gather: Gather = gather) -> None:
                keys, values = gather(layer)
                attend(q, keys, values, mask)  # noqa: B023 (runs inside this iteration)

            g_ms = time_step(gather, args.repeats)
            s_ms = time_step(step, args.repeats)
            print(f"{k:>5}  {name:<28} {g_ms:>10.1f} {s_ms:>10.1f}", flush=True)
            del gather, step


if __name__ == "__main__":
    main()
