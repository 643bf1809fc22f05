"""The KV block pool's bookkeeping: reference counts, free lists and the prefix cache."""

from __future__ import annotations

import pytest

from treadle.scheduler.block_pool import BlockPool, block_hash, chain_hashes


def test_equal_prefixes_hash_equal_and_a_different_parent_changes_the_hash() -> None:
    a = chain_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], block_size=4)
    b = chain_hashes([1, 2, 3, 4, 5, 6, 7, 8], block_size=4)
    assert len(a) == 2 and a == b  # the partial last block is not hashed
    assert chain_hashes([0, 2, 3, 4, 5, 6, 7, 8], block_size=4)[1] != a[1]  # parent differs
    assert block_hash(None, [5, 6, 7, 8]) != a[1]
    assert chain_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, start=1, parent=a[0]) == a[1:]


def test_plain_blocks_are_reused_last_freed_first_before_any_cached_block() -> None:
    pool = BlockPool(num_blocks=6, block_size=4)
    held = pool.allocate(4)
    assert held == [0, 1, 2, 3]
    pool.register(held[0], b"h0", None, [1, 2, 3, 4])
    pool.free(held)  # tail first: 3, 2, 1 go plain; 0 is cached
    assert pool.num_free == 6 and pool.num_cached == 1
    assert pool.allocate(2) == [1, 2]  # the most recently freed plain blocks
    assert pool.allocate(3) == [3, 4, 5]
    assert pool.cached_prefix([b"h0"]) == [0]  # still cached: nothing else was free
    assert pool.allocate(1) == [0]  # now it is evicted
    assert pool.cached_prefix([b"h0"]) == [] and pool.num_cached == 0
    with pytest.raises(RuntimeError):
        pool.allocate(1)


def test_a_cached_block_is_shared_and_freed_only_by_its_last_holder() -> None:
    pool = BlockPool(num_blocks=4, block_size=4)
    (block,) = pool.allocate(1)
    pool.register(block, b"h", None, [1, 2])
    pool.touch(pool.cached_prefix([b"h", b"missing"]))  # a second holder
    assert pool.ref_count[block] == 2
    pool.free([block])
    assert not pool.is_free(block)
    pool.free([block])
    assert pool.is_free(block) and pool.cached_prefix([b"h"]) == [block]
    pool.touch([block])  # a hit on a free cached block takes it off the free list
    assert pool.num_free == 3 and pool.ref_count[block] == 1
    with pytest.raises(RuntimeError):
        pool.free([block, block])


def test_clearing_the_cache_forgets_every_hash_and_keeps_the_blocks_free() -> None:
    pool = BlockPool(num_blocks=3, block_size=2)
    blocks = pool.allocate(2)
    for i, b in enumerate(blocks):
        pool.register(b, bytes([i]), bytes([i - 1]) if i else None, [i, i])
    pool.free(blocks)
    pool.clear_cache()
    assert pool.num_cached == 0 and pool.num_free == 3
    assert pool.cached_prefix([b"\x00"]) == []
    assert sorted(pool.allocate(3)) == [0, 1, 2]


def test_without_prefix_caching_nothing_is_registered() -> None:
    pool = BlockPool(num_blocks=2, block_size=2, cache_prefixes=False)
    (block,) = pool.allocate(1)
    pool.register(block, b"h", None, [1, 2])
    assert pool.num_cached == 0 and pool.cached_prefix([b"h"]) == []


def test_a_prefix_ending_inside_a_block_matches_the_longest_cached_child() -> None:
    pool = BlockPool(num_blocks=6, block_size=4)
    first, a, b, other = pool.allocate(4)
    pool.register(first, b"p", None, [1, 2, 3, 4])
    pool.register(a, b"a", b"p", [5, 6, 7, 8])
    pool.register(b, b"b", b"p", [5, 6, 9, 9])
    pool.register(other, b"o", b"x", [5, 6, 7, 0])  # same tokens after another parent
    assert pool.partial_match(b"p", [5, 6, 7]) == (a, 3)
    assert pool.partial_match(b"p", [5, 6, 9, 1]) == (b, 3)
    assert pool.partial_match(b"p", [5, 0]) in {(a, 1), (b, 1)}
    assert pool.partial_match(b"p", [6, 6]) is None
    assert pool.partial_match(None, [1, 2]) == (first, 2)
    pool.free([a])
    pool.allocate(3)  # evicts: plain blocks first, then the cached free `a`
    assert pool.partial_match(b"p", [5, 6, 7]) == (b, 2)
    pool.clear_cache()
    assert pool.partial_match(None, [1, 2]) is None
