"""Who holds each KV block: reference counts, the free list and the prefix cache.

The worker's KV pool is `num_blocks` blocks of `block_size` positions; this
is its bookkeeping, on the scheduler's side (pure Python, no tensors). A
request holds a list of blocks (its block table). A block is held by every
request whose table names it (`ref_count`); a block nobody holds is free.

Full blocks are content-addressed: a block's hash covers its tokens and the
hash of the block before it, so equal hashes mean equal prefixes. A full
block whose KV was computed is registered under its hash; a later request
whose prompt starts with the same blocks takes them (`touch`) instead of
computing them again. A free cached block keeps its content and stays
findable until it is reused.

A prefix that ends inside a block is found too (`partial_match`): among the
cached blocks that follow the request's last cached full block, the one whose
first tokens agree longest with the request's next tokens. Its KV for those
positions depends only on the prefix, so the request takes a copy of it (copy
on write: it will write its own tokens into the rest) and computes only from
there: a prefix cache at token granularity, like SGLang's radix cache, on
blocks of any size.

Two free lists: blocks with nothing cached are reused last-freed first (their
memory is the most recently touched: no page faults, warm caches, and the
pool's untouched pages stay uncommitted until the load needs them); cached
blocks are evicted only when no other block is free, least recently freed
first, and a request's blocks are freed tail first, so the ends of prompts
are evicted before the prefixes they share (vLLM v1's order).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence

BlockHash = bytes
_Branch = tuple[BlockHash | None, int]  # (parent block's hash, first token)


def block_hash(parent: BlockHash | None, tokens: Sequence[int]) -> BlockHash:
    """The content address of a full block: its tokens after its parent's hash (8 bytes
    each: an image token is keyed by a 63-bit id of its image, `Request.content_ids`)."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(b"".join(t.to_bytes(8, "little", signed=True) for t in tokens))
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
        self._free_plain = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives 0 first
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # least recently freed first
        self._hash_of: dict[int, BlockHash] = {}  # registered blocks, held or free
        self._block_of: dict[BlockHash, int] = {}
        # registered blocks with their tokens, by (the hash of the block before them (None:
        # first blocks), their first token): where partial matches are looked for
        self._children: dict[_Branch, dict[int, tuple[int, ...]]] = {}
        self._branch_of: dict[int, _Branch] = {}

    # -- state -------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks no request holds (cached or not): what `allocate` can hand out."""
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache (held or free)."""
        return len(self._hash_of)

    def is_free(self, block: int) -> bool:
        return self.ref_count[block] == 0

    # -- allocation ----------------------------------------------------------------
    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks: plain ones first (last freed first), then cached ones
        (least recently freed first), whose cached content is forgotten."""
        if n > self.num_free:
            raise RuntimeError(f"{n} blocks asked, {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self._free_plain:
                block = self._free_plain.pop()
            else:
                block, _ = self._free_cached.popitem(last=False)
                self._forget(block)
            self.ref_count[block] = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Iterable[int]) -> None:
        """One more holder for each of `blocks` (cached blocks a request reuses)."""
        for block in blocks:
            if self.ref_count[block] == 0:  # a free block that is touched is a cached one
                del self._free_cached[block]
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
                if block in self._hash_of:
                    self._free_cached[block] = None
                else:
                    self._free_plain.append(block)

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

    def partial_match(
        self, parent: BlockHash | None, tokens: Sequence[int]
    ) -> tuple[int, int] | None:
        """The cached block after `parent` (None: a first block) whose tokens begin with
        the longest run of `tokens`, and that run's length: (block, k) with
        1 <= k <= len(tokens); None if no cached block begins with tokens[0]."""
        best: tuple[int, int] | None = None
        if not self.cache_prefixes or not tokens:
            return None
        for block, content in self._children.get((parent, tokens[0]), {}).items():
            k = _common_prefix(content, tokens)
            if k and (best is None or k > best[1]):
                best = (block, k)
        return best

    def register(
        self, block: int, h: BlockHash, parent: BlockHash | None, tokens: Sequence[int]
    ) -> None:
        """Held `block` now holds the full block hashed `h`: `tokens` after the block hashed
        `parent` (a copy already registered wins)."""
        if self.cache_prefixes and h not in self._block_of and block not in self._hash_of:
            self._block_of[h] = block
            self._hash_of[block] = h
            branch = (parent, tokens[0])
            self._branch_of[block] = branch
            self._children.setdefault(branch, {})[block] = tuple(tokens)

    def clear_cache(self) -> None:
        """Forget every cached block (their content may be wrong after a failed step)."""
        self._hash_of.clear()
        self._block_of.clear()
        self._children.clear()
        self._branch_of.clear()
        self._free_plain.extend(self._free_cached)
        self._free_cached.clear()

    def _forget(self, block: int) -> None:
        h = self._hash_of.pop(block, None)
        if h is not None:
            del self._block_of[h]
            branch = self._branch_of.pop(block)
            siblings = self._children[branch]
            del siblings[block]
            if not siblings:
                del self._children[branch]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):  # noqa: B905 - lengths differ on purpose
        if x != y:
            break
        n += 1
    return n
