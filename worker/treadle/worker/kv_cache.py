"""The KV cache in the slot layout: one row of preallocated positions per sequence.

Keys and values of every layer live in two buffers of shape
`[layers, rows, kv_heads, max_len, head_dim]`, allocated once. A sequence owns
one row from prefill to its end; active sequences occupy the leading rows, so a
decode step reads a view of the first D rows and nothing is ever concatenated
or reallocated when sequences join or leave. Freed rows are filled by moving
a later row down (`move`), which copies only that row's live positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .plan import RowMove


@dataclass(frozen=True, slots=True)
class KVShape:
    """Geometry of the cache, derived from the model config and the server settings."""

    layers: int
    rows: int
    kv_heads: int
    max_len: int
    head_dim: int

    @classmethod
    def for_model(cls, config: Any, rows: int, max_len: int) -> KVShape:
        heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers,
            rows=rows,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            max_len=max_len,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        )

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return self.layers * 2 * self.kv_heads * self.head_dim * itemsize


class SlotKVCache:
    """Preallocated key/value buffers, one row per running sequence."""

    def __init__(self, shape: KVShape, dtype: torch.dtype, device: torch.device) -> None:
        self.shape = shape
        dims = (shape.layers, shape.rows, shape.kv_heads, shape.max_len, shape.head_dim)
        self.keys = _zeros(dims, dtype, device)  # [L, R, KVH, max_len, Dh]
        self.values = _zeros(dims, dtype, device)  # [L, R, KVH, max_len, Dh]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def write(
        self,
        layer: int,
        rows: torch.Tensor,
        positions: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> None:
        """Store token t's key/value at (rows[t], positions[t]); keys/values are `[T, KVH, Dh]`."""
        self.keys[layer][rows, :, positions] = keys
        self.values[layer][rows, :, positions] = values

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value buffers of one layer, each `[R, KVH, max_len, Dh]`."""
        return self.keys[layer], self.values[layer]

    def move(self, moves: Sequence[RowMove]) -> None:
        """Apply row moves in order: copy the live positions of `src` into `dst`."""
        for m in moves:
            self.keys[:, m.dst, :, : m.length] = self.keys[:, m.src, :, : m.length]
            self.values[:, m.dst, :, : m.length] = self.values[:, m.src, :, : m.length]


def _zeros(dims: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled buffer. Zeros matter: positions past a row's length are masked in
    attention, and masked zeros (unlike uninitialised memory) can never turn into NaN.

    On the CPU the buffer comes from calloc (through numpy), so the operating system
    hands out zero pages only as rows are first written: start-up is instant and
    resident memory grows with the tokens actually held, up to the configured size.
    """
    if device.type == "cpu":
        try:
            np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        except TypeError:  # no numpy equivalent (bfloat16)
            np_dtype = None
        if np_dtype is not None:
            return torch.from_numpy(np.zeros(dims, dtype=np_dtype))
    return torch.zeros(dims, dtype=dtype, device=device)
