"""The KV cache as a paged pool: fixed-size blocks shared by all sequences.

Keys and values of every layer live in two views of shape
`[layers, num_blocks, kv_heads, block_size, head_dim]` over the worker's one
KV buffer (`kv_arena.py`, shared with the decode lanes), allocated once. A
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
the arena keeps (grow-only), because freshly allocated memory page-faults on
every step; keys and values are gathered by one `index_select`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .kv_arena import KVArena
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
    """The block pool's key/value storage, a region of the worker's `KVArena`, and the index
    arithmetic of its layout.

    Per step, the layout (`layout.py`) builds its indices once (`write_rows`,
    `block_rows`) and every layer reuses them (`KVArena.write`, `gather`).
    """

    def __init__(self, shape: KVShape, arena: KVArena, offset: int = 0) -> None:
        """The pool in `arena`'s rows offset.. (`rows_for(shape)` of them): keys, then values."""
        self.shape = shape
        self.arena = arena
        self.offset = offset
        dims = (shape.num_blocks, shape.kv_heads, shape.block_size)
        self.keys = arena.region(offset, dims)  # [L, NB, KVH, bs, Dh]
        self.values = arena.region(offset + self._half, dims)  # [L, NB, KVH, bs, Dh]

    @classmethod
    def create(cls, shape: KVShape, dtype: torch.dtype, device: torch.device) -> PagedKVCache:
        """A pool in an arena of its own (no decode lanes)."""
        rows = cls.rows_for(shape)
        arena = KVArena(shape.layers, rows, shape.head_dim, shape.block_size, dtype, device)
        return cls(shape, arena)

    @staticmethod
    def rows_for(shape: KVShape) -> int:
        """Arena rows the pool takes: keys and values of every block's heads and positions."""
        return 2 * shape.num_blocks * shape.kv_heads * shape.block_size

    @property
    def _half(self) -> int:  # rows of the keys (the values follow them)
        return self.rows_for(self.shape) // 2

    @property
    def block_size(self) -> int:
        return self.shape.block_size

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    def write_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Arena rows `[2, KVH, T]` of T tokens at pool slots `slots` `[T]` (slot = block *
        block_size + offset): keys, then values, in the order of the step's stacked
        keys and values `[2 * KVH, T, Dh]`."""
        bs, kv_heads = self.shape.block_size, self.shape.kv_heads
        heads = torch.arange(kv_heads, device=slots.device)[:, None]  # [KVH, 1]
        rows = ((slots // bs)[None, :] * kv_heads + heads) * bs + (slots % bs)[None, :]  # [KVH, T]
        return self.offset + torch.stack((rows, rows + self._half))  # [2, KVH, T]

    def block_rows(self, tables: torch.Tensor) -> torch.Tensor:
        """Arena block rows `[2, R, KVH, nb]` of the blocks `tables` `[R, nb]` (block ids):
        keys, then values; one row holds one block of one KV head."""
        kv_heads = self.shape.kv_heads
        heads = torch.arange(kv_heads, device=tables.device)[None, :, None]  # [1, KVH, 1]
        rows = tables[:, None, :] * kv_heads + heads  # [R, KVH, nb]
        first = self.offset // self.shape.block_size
        return first + torch.stack((rows, rows + self._half // self.shape.block_size))

    def gather(
        self, layer: int, index: torch.Tensor, rows: int, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first `length` positions of `rows` block tables, each
        `[rows, KVH, length, Dh]`, gathered at `index` (`block_rows`, flattened).

        The result lives in the arena's scratch buffer: valid until the next `gather`.
        """
        shape = self.shape
        blocks = index.numel() // (2 * rows * shape.kv_heads)  # nb
        out = self.arena.gather(layer, index)  # [2 * R * KVH * nb, bs * Dh]
        whole = out.view(2, rows, shape.kv_heads, blocks * shape.block_size, shape.head_dim)
        return whole[0, :, :, :length], whole[1, :, :, :length]  # [R, KVH, length, Dh] each

    def copy(self, copies: Sequence[BlockCopy]) -> None:
        """Apply block copies in order: every position of `src` into `dst`, in every layer."""
        for c in copies:
            if c.src != c.dst:
                self.keys[:, c.dst] = self.keys[:, c.src]
                self.values[:, c.dst] = self.values[:, c.src]
