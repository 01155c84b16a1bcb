"""The block pool: allocation and ref counts, LRU eviction, the prefix hash chain."""
from __future__ import annotations

import pytest

from fastllm.core.kv_cache import BlockPool


def pool(num_blocks: int = 9, block_size: int = 4, caching: bool = True) -> BlockPool:
    return BlockPool(num_blocks, block_size, caching)


def computed(p: BlockPool, seq: str, tokens: list[int]) -> list[int]:
    """A sequence that ran all of `tokens` and published its full blocks; its block table."""
    assert p.match_prefix(seq, tokens) == 0
    assert p.reserve(seq, len(tokens))
    p.cache_full_blocks(seq, tokens, len(tokens))
    return list(p.block_table(seq))


def test_block_zero_is_never_handed_out_and_counts_are_exact():
    p = pool(num_blocks=5)
    assert p.num_free_blocks == 4 and p.can_allocate(16) and not p.can_allocate(17)
    p.allocate("a", 9)  # 3 blocks
    assert 0 not in p.block_table("a") and len(p.block_table("a")) == 3
    assert p.num_free_blocks == 1 and p.can_allocate(4) and not p.can_allocate(5)
    with pytest.raises(RuntimeError, match="can_allocate"):
        p.allocate("b", 5)
    assert "b" not in p.tables and p.num_free_blocks == 1
    p.free("a")
    p.free("a")  # a second free gives nothing back twice
    assert p.num_free_blocks == 4 and p.ref == [0] * 5


def test_reserve_grows_a_table_and_changes_nothing_when_short():
    p = pool(num_blocks=4)
    assert p.reserve("a", 1) and p.block_table("a") == [1]
    assert p.reserve("a", 4) and p.block_table("a") == [1]  # still one block
    assert p.reserve("a", 5) and p.block_table("a") == [1, 2]
    assert not p.reserve("a", 13) and p.block_table("a") == [1, 2] and p.num_free_blocks == 1
    assert not p.reserve("b", 5) and "b" not in p.tables
    assert p.reserve("a", 12) and p.num_free_blocks == 0


def test_hits_only_on_full_computed_blocks_and_cap_at_the_last_token():
    p = pool()
    tokens = list(range(10))  # blocks [0-3] [4-7] and a partial [8, 9]
    computed(p, "a", tokens)
    assert p.match_prefix("b", tokens) == 8  # the partial block is never cached
    assert p.match_prefix("c", tokens[:8]) == 4  # 8 cached, but the last token is recomputed
    assert p.match_prefix("d", tokens[:9]) == 8
    assert p.match_prefix("e", [0, 1, 2, 3, 4, 5, 9, 9, 9]) == 4  # the chain stops at the first miss
    assert p.match_prefix("f", [1, 1, 2, 3, 4, 5, 6, 7, 8]) == 0  # same second block, other parent
    assert p.block_table("b")[:2] == p.block_table("a")[:2]
    # counted once a sequence gets its blocks, so a lookup retried while it waits counts once
    assert (p.prefix_hits, p.prefix_queries) == (0, 10)
    for s in "bcdef":
        assert p.reserve(s, 1)
    assert p.prefix_hits == 8 + 4 + 8 + 4 and p.prefix_queries == 10 + 10 + 8 + 9 + 9 + 9
    p.free("b")
    p.match_prefix("b", tokens)
    p.free("b")  # admission failed: not counted
    assert p.prefix_hits == 24


def test_only_computed_blocks_are_published():
    p = pool()
    tokens = list(range(12))
    assert p.match_prefix("a", tokens) == 0 and p.reserve("a", 12)
    p.cache_full_blocks("a", tokens, 6)  # a chunk of 6: one block full
    assert p.match_prefix("b", tokens) == 4
    p.cache_full_blocks("a", tokens, 12)
    assert p.match_prefix("c", tokens) == 8


def test_collision_guard_compares_tokens():
    p = pool()
    computed(p, "a", [1, 2, 3, 4, 5])
    (h, b), = p.cached.items()
    p.block_tokens[b] = (9, 9, 9, 9)  # what a hash collision looks like: same hash, other tokens
    assert p.match_prefix("b", [1, 2, 3, 4, 5]) == 0


def test_shared_blocks_are_ref_counted_and_survive_one_free():
    p = pool()
    tokens = list(range(9))
    a = computed(p, "a", tokens)
    assert p.match_prefix("b", tokens) == 8 and p.reserve("b", 9)
    assert [p.ref[x] for x in a] == [2, 2, 1]
    free_before = p.num_free_blocks
    p.free("a")
    assert p.num_free_blocks == free_before + 1  # only a's own last block
    assert p.match_prefix("c", tokens) == 8
    for s in ("b", "c"):
        p.free(s)
    assert sum(p.ref) == 0 and p.num_free_blocks == 8


def test_freed_blocks_keep_their_hash_until_evicted_least_recent_first():
    p = pool(num_blocks=7)  # 6 usable blocks
    a = computed(p, "a", list(range(12)))  # 3 full blocks
    b = computed(p, "b", list(range(100, 112)))
    p.free("a")
    p.free("b")
    # eviction order: a's blocks last-first, then b's: a sequence's tail goes before its head
    assert list(p.free_queue) == a[::-1] + b[::-1]
    assert p.match_prefix("a2", list(range(12)) + [0]) == 12  # the hash survived the free
    assert list(p.free_queue) == b[::-1]
    p.free("a2")
    assert list(p.free_queue) == b[::-1] + a[::-1]  # touched again: now most recent
    assert p.reserve("x", 8)  # pops b's last two blocks and forgets their hashes
    assert p.block_table("x") == [b[2], b[1]]
    assert p.match_prefix("b2", list(range(100, 112)) + [0]) == 4  # b's first block still cached
    assert p.match_prefix("a3", list(range(12)) + [0]) == 12


def test_unhashed_free_blocks_are_evicted_before_cached_ones():
    p = pool(num_blocks=5)
    cached = computed(p, "a", list(range(4)))
    p.allocate("tmp", 8)
    tmp = p.block_table("tmp")
    p.free("a")
    p.free("tmp")
    assert list(p.free_queue) == tmp + [4] + cached  # block 4 was never used


def test_a_twin_block_computed_twice_stays_unhashed():
    p = pool()
    tokens = list(range(8))
    for s in ("a", "b"):  # two requests prefilled in the same step: no hit for the second
        assert p.match_prefix(s, tokens) == 0 and p.reserve(s, 8)
    p.cache_full_blocks("a", tokens, 8)
    p.cache_full_blocks("b", tokens, 8)
    assert sorted(p.cached.values()) == sorted(p.block_table("a"))
    assert all(p.block_hash[x] is None for x in p.block_table("b"))
    p.free("a")
    p.free("b")
    assert sum(p.ref) == 0 and p.num_free_blocks == 8 and len(p.cached) == 2


def test_prefix_caching_off_never_hits():
    p = pool(caching=False)
    tokens = list(range(9))
    assert p.match_prefix("a", tokens) == 0 and p.reserve("a", 9)
    p.cache_full_blocks("a", tokens, 9)
    assert not p.cached and p.match_prefix("b", tokens) == 0 and p.reserve("b", 9) and p.prefix_queries == 18


def test_reset_prefix_cache_forgets_free_blocks_and_keeps_those_in_use():
    p = pool()
    held, gone = list(range(9)), list(range(100, 109))
    computed(p, "held", held)
    computed(p, "gone", gone)
    p.free("gone")
    p.reset_prefix_cache()
    assert p.match_prefix("x", gone) == 0  # freed: forgotten
    assert p.match_prefix("y", held) == 8  # still held by a running sequence: kept
    for s in ("held", "x", "y"):
        p.free(s)
    assert sum(p.ref) == 0 and p.num_free_blocks == 8
