"""One buffer for every key/value row the worker keeps: the pool's and the decode lanes'.

Each layer's keys and values of the paged pool (`kv_cache.py`) and of every
decode lane tier (`lane_tier.py`) are regions of one `[layers, rows, head_dim]`
tensor, allocated and committed once. A row is one position of one KV head.
The pool and the tiers keep their own 5-D views of their regions and their own
index arithmetic (which arena rows a position lives in); the arena does what
crosses regions, a layer at a time, in as few torch calls as possible, since
a call costs about as much as the small copies themselves:

- `write`: a step's new keys and values into the pool and into the lanes,
  one `index_put_`;
- `copy_blocks`: pool blocks into lanes (a sequence new to its lane), one
  gather and one `index_put_`;
- `gather`: keys and values of block tables (prefill chunks, decode rows
  without a lane), one `index_select` into a scratch buffer.

Every region starts and ends on a block boundary, so the arena is also a
table of block rows, `[rows / block_size, block_size * head_dim]`: one block of
one KV head (of keys or of values) per row.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class KVArena:
    """The buffer `[L, R, Dh]` and the cross-region copies; regions are handed out by offset."""

    def __init__(
        self,
        layers: int,
        rows: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if rows % block_size:
            raise ValueError(f"an arena of {rows} rows is not whole blocks of {block_size}")
        self.block_size = block_size
        self.head_dim = head_dim
        self.buffer = zeroed((layers, rows, head_dim), dtype, device)  # [L, R, Dh]
        self._scratch = torch.empty(0, dtype=dtype, device=device)  # flat, grow-only

    @property
    def rows(self) -> int:
        return int(self.buffer.shape[1])

    def region(self, offset: int, dims: tuple[int, ...]) -> torch.Tensor:
        """The view `[L, *dims, Dh]` of rows offset.. (dims: their shape, e.g. blocks x
        heads x positions); a view, not a copy."""
        n = math.prod(dims)
        if offset < 0 or offset + n > self.rows:
            raise ValueError(f"rows {offset}..{offset + n - 1} outside the arena's {self.rows}")
        layers = self.buffer.shape[0]
        return self.buffer[:, offset : offset + n].view(layers, *dims, self.head_dim)

    def write(
        self, layer: int, rows: torch.Tensor, kv: torch.Tensor, source: torch.Tensor | None
    ) -> None:
        """Store rows `kv` `[S, Dh]` of one layer (a step's keys, then its values, flat) at
        arena rows `rows` `[M]`: kv's rows `source` `[M]`, or all of them in order (None)."""
        picked = kv if source is None else kv.index_select(0, source)  # [M, Dh]
        self.buffer[layer].index_put_((rows,), picked)

    def copy_blocks(self, layer: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy block rows `src` `[F]` onto block rows `dst` `[F]` of one layer."""
        blocks = self._blocks(layer)  # [R / bs, bs * Dh]
        blocks.index_put_((dst,), blocks.index_select(0, src))

    def gather(self, layer: int, index: torch.Tensor) -> torch.Tensor:
        """Block rows `index` `[n]` of one layer as `[n, bs * Dh]`, in the arena's scratch
        buffer: valid until the next `gather`."""
        width = self.block_size * self.head_dim
        need = int(index.numel()) * width
        if self._scratch.numel() < need:  # grow by half at least: rows lengthen every step
            size = max(need, self._scratch.numel() * 3 // 2)
            self._scratch = torch.empty(size, dtype=self.buffer.dtype, device=self.buffer.device)
        out = self._scratch[:need].view(-1, width)  # [n, bs * Dh]
        torch.index_select(self._blocks(layer), 0, index, out=out)
        return out

    def _blocks(self, layer: int) -> torch.Tensor:
        return self.buffer[layer].view(-1, self.block_size * self.head_dim)


def zeroed(dims: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled buffer, written once, so its memory is committed at start: the server's
    footprint is known from the first step (an over-large pool fails at start, not under
    load) and stays flat. Zeros matter too: positions past a row's length are masked in
    attention, and masked zeros (unlike uninitialised memory) can never turn into NaN.

    On the CPU the buffer is zeroed by numpy, on one thread, never by a torch op: the
    pool is built on the thread that builds the engine, and an OpenMP parallel region on
    that thread (`torch.zeros` of a gigabyte is one) leaves libgomp's team with it, which
    makes every parallel region of the step thread, where the model runs, cost about
    0.1 ms more: a third of a W1 decode step, measured.
    """
    if device.type != "cpu":
        return torch.zeros(dims, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = np.zeros(math.prod(dims) * itemsize, dtype=np.uint8)  # calloc: pages not yet touched
    raw.fill(0)  # touch every page (commit the memory), single-threaded
    return torch.from_numpy(raw).view(dtype).view(dims)
