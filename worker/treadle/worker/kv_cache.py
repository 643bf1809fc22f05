"""The KV cache as a paged pool: fixed-size blocks shared by all sequences.

Keys and values of every layer live in two buffers of shape
`[layers, num_blocks, kv_heads, block_size, head_dim]`, allocated once. A
sequence's positions are spread over the blocks of its block table (owned by
the scheduler): position p is offset `p % block_size` of block
`table[p // block_size]`. Nothing is reallocated or concatenated when
sequences join or leave.

Why this layout (measured with bench/attention_gather.py on the CPU): a
block's positions are contiguous *per KV head*, so gathering a row's blocks
(`index_select` on the view `[num_blocks * kv_heads, block_size * head_dim]`)
copies whole blocks of one head at a time (4 KiB for SmolLM2 in fp32) and
lands directly in the `[rows, kv_heads, positions, head_dim]` order that
scaled-dot-product attention reads fastest. Gathers go into a scratch buffer
the cache keeps (grow-only), because freshly allocated memory page-faults on
every step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .plan import BlockCopy


@dataclass(frozen=True, slots=True)
class KVShape:
    """Geometry of the pool, derived from the model config and the server settings."""

    layers: int
    kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int  # positions per block

    @classmethod
    def for_model(cls, config: Any, num_blocks: int, block_size: int) -> KVShape:
        """The pool shape for a model of `config` (a vision-language model's text config)."""
        config = config.get_text_config()
        heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            num_blocks=num_blocks,
            block_size=block_size,
        )

    @property
    def num_tokens(self) -> int:
        """Positions the whole pool holds."""
        return self.num_blocks * self.block_size

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """Keys and values of one position in every layer."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return self.layers * 2 * self.kv_heads * self.head_dim * itemsize

    def bytes_per_block(self, dtype: torch.dtype) -> int:
        return self.block_size * self.bytes_per_token(dtype)


class PagedKVCache:
    """The block pool's key/value storage, and the index arithmetic of its layout.

    Per step, the attention builds its indices once (`write_index`,
    `gather_index`) and every layer reuses them (`write`, `gather`).
    """

    def __init__(self, shape: KVShape, dtype: torch.dtype, device: torch.device) -> None:
        self.shape = shape
        dims = (shape.layers, shape.num_blocks, shape.kv_heads, shape.block_size, shape.head_dim)
        self.keys = zeroed(dims, dtype, device)  # [L, NB, KVH, bs, Dh]
        self.values = zeroed(dims, dtype, device)  # [L, NB, KVH, bs, Dh]
        self._scratch = [_empty(0, dtype, device), _empty(0, dtype, device)]  # flat, grow-only

    @property
    def block_size(self) -> int:
        return self.shape.block_size

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def write_index(self, slots: torch.Tensor) -> torch.Tensor:
        """Storage rows `[KVH * T]` for the keys of T tokens at pool slots `slots` `[T]`
        (slot = block * block_size + offset), in the `[KVH, T]` order of attention's keys."""
        bs, kv_heads = self.shape.block_size, self.shape.kv_heads
        heads = torch.arange(kv_heads, device=slots.device)[:, None]  # [KVH, 1]
        rows = ((slots // bs)[None, :] * kv_heads + heads) * bs + (slots % bs)[None, :]
        return rows.reshape(-1)  # [KVH * T]

    def write(
        self, layer: int, index: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """Store keys/values `[KVH, T, Dh]` of one layer at `index` (from `write_index`)."""
        head_dim = self.shape.head_dim  # index_put_: several times faster than index_copy_
        self.keys[layer].view(-1, head_dim)[index] = keys.reshape(-1, head_dim)
        self.values[layer].view(-1, head_dim)[index] = values.reshape(-1, head_dim)

    def gather_index(self, tables: torch.Tensor) -> torch.Tensor:
        """Storage rows `[R * KVH * nb]` of the blocks `tables` `[R, nb]` (block ids), in
        `[R, KVH, nb]` order: one row holds one block of one KV head."""
        kv_heads = self.shape.kv_heads
        heads = torch.arange(kv_heads, device=tables.device)[None, :, None]  # [1, KVH, 1]
        return (tables[:, None, :] * kv_heads + heads).reshape(-1)  # [R * KVH * nb]

    def gather(
        self, layer: int, index: torch.Tensor, rows: int, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first `length` positions of `rows` block tables, each
        `[rows, KVH, length, Dh]`, gathered at `index` (from `gather_index`).

        The result lives in the cache's scratch buffer: valid until the next `gather`.
        """
        shape = self.shape
        blocks = index.numel() // (rows * shape.kv_heads)  # nb
        need = index.numel() * shape.block_size * shape.head_dim
        if self._scratch[0].numel() < need:  # grow by half at least: rows lengthen every step
            size = max(need, self._scratch[0].numel() * 3 // 2)
            self._scratch = [_empty(size, t.dtype, t.device) for t in (self.keys, self.values)]
        out: list[torch.Tensor] = []
        for buf, scratch in zip((self.keys, self.values), self._scratch, strict=True):
            src = buf[layer].view(-1, shape.block_size * shape.head_dim)  # [NB*KVH, bs*Dh]
            dst = scratch[:need].view(index.numel(), -1)  # [R*KVH*nb, bs*Dh]
            torch.index_select(src, 0, index, out=dst)
            whole = dst.view(rows, shape.kv_heads, blocks * shape.block_size, shape.head_dim)
            out.append(whole[:, :, :length])  # [R, KVH, length, Dh]
        return out[0], out[1]

    def copy(self, copies: Sequence[BlockCopy]) -> None:
        """Apply block copies in order: every position of `src` into `dst`, in every layer."""
        for c in copies:
            if c.src != c.dst:
                self.keys[:, c.dst] = self.keys[:, c.src]
                self.values[:, c.dst] = self.values[:, c.src]


def _empty(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(numel, dtype=dtype, device=device)


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
