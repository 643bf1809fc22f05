"""Who holds each KV block: reference counts, the free list and the prefix cache.

The worker's KV pool is `num_blocks` blocks of `block_size` positions; this
is its bookkeeping, on the scheduler's side (pure Python, no tensors). A
request holds a list of blocks (its block table). A block is held by every
request whose table names it (`ref_count`); a block nobody holds is free.

Full blocks are content-addressed: a block's hash covers its tokens and the
hash of the block before it, so equal hashes mean equal prefixes. A full
block whose KV was computed is registered under its hash; a later request
whose prompt starts with the same blocks takes them (`touch`) instead of
computing them again. A free block keeps its content and stays findable
until it is reused: the free list is least-recently-freed first, and a
request's blocks are freed tail first, so the ends of prompts are evicted
before the prefixes they share (vLLM v1's policy).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence

BlockHash = bytes


def block_hash(parent: BlockHash | None, tokens: Sequence[int]) -> BlockHash:
    """The content address of a full block: its tokens after its parent's hash."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(b"".join(t.to_bytes(4, "little", signed=True) for t in tokens))
    return h.digest()


def chain_hashes(
    tokens: Sequence[int], block_size: int, start: int = 0, parent: BlockHash | None = None
) -> list[BlockHash]:
    """Hashes of the full blocks of `tokens` from block `start` on (`parent`: the hash of
    block `start - 1`)."""
    out: list[BlockHash] = []
    for i in range(start, len(tokens) // block_size):
        parent = block_hash(parent, tokens[i * block_size : (i + 1) * block_size])
        out.append(parent)
    return out


class BlockPool:
    """Allocation, sharing and caching of the KV pool's blocks."""

    def __init__(self, num_blocks: int, block_size: int, cache_prefixes: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a pool of {num_blocks} blocks of {block_size} positions")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.cache_prefixes = cache_prefixes
        self.ref_count = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._hash_of: dict[int, BlockHash] = {}  # registered blocks, held or free
        self._block_of: dict[BlockHash, int] = {}

    # -- state -------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks no request holds (cached or not): what `allocate` can hand out."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache (held or free)."""
        return len(self._hash_of)

    def is_free(self, block: int) -> bool:
        return block in self._free

    # -- allocation ----------------------------------------------------------------
    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks (least recently freed first); a cached one is forgotten."""
        if n > len(self._free):
            raise RuntimeError(f"{n} blocks asked, {len(self._free)} free")
        blocks = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            self._forget(block)
            self.ref_count[block] = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Iterable[int]) -> None:
        """One more holder for each of `blocks` (cached blocks a request reuses)."""
        for block in blocks:
            if self.ref_count[block] == 0:
                del self._free[block]
            self.ref_count[block] += 1

    def free(self, blocks: Sequence[int]) -> None:
        """One holder fewer for each of `blocks` (a request's table, in order): the last
        holder gone, a block becomes free, tail blocks first (they are evicted first)."""
        for block in reversed(blocks):
            count = self.ref_count[block] - 1
            if count < 0:
                raise RuntimeError(f"block {block} freed more often than taken")
            self.ref_count[block] = count
            if count == 0:
                self._free[block] = None

    # -- the prefix cache ----------------------------------------------------------
    def cached_prefix(self, hashes: Sequence[BlockHash]) -> list[int]:
        """The cached blocks of the longest run of `hashes` from the start (not touched)."""
        blocks: list[int] = []
        if self.cache_prefixes:
            for h in hashes:
                block = self._block_of.get(h)
                if block is None:
                    break
                blocks.append(block)
        return blocks

    def register(self, block: int, h: BlockHash) -> None:
        """`block` now holds the full block hashed `h` (a copy already registered wins)."""
        if self.cache_prefixes and h not in self._block_of and block not in self._hash_of:
            self._block_of[h] = block
            self._hash_of[block] = h

    def clear_cache(self) -> None:
        """Forget every cached block (their content may be wrong after a failed step)."""
        self._hash_of.clear()
        self._block_of.clear()

    def _forget(self, block: int) -> None:
        h = self._hash_of.pop(block, None)
        if h is not None:
            del self._block_of[h]
