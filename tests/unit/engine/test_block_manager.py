"""Block allocator: reference counts, prefix-cache index, LRU reuse, and no leaks on any path."""

from __future__ import annotations

import random

import pytest

from pdserve.engine.block_hash import BlockHash, chain_block_hashes, hash_block
from pdserve.engine.block_manager import BlockManager

FP = b"fingerprint-0000"


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(8, 16)
    a = bm.allocate(3)
    b = bm.allocate(5)
    assert bm.num_free_blocks == 0
    with pytest.raises(MemoryError):
        bm.allocate(1)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8
    assert all(c == 0 for c in bm.ref_counts)


def test_double_free_is_caught():
    bm = BlockManager(4, 16)
    ids = bm.allocate(1)
    bm.free(ids)
    with pytest.raises(AssertionError):
        bm.free(ids)


def test_prefix_hit_shares_block_and_counts_references():
    bm = BlockManager(8, 16)
    hashes = chain_block_hashes(list(range(48)), 16, FP)
    ids = bm.allocate(3)
    for i, h in zip(ids, hashes):
        bm.register(i, h)
    assert bm.match_prefix(hashes) == ids
    bm.take(ids[:2])  # a second sequence shares the first two blocks
    assert bm.ref_counts[ids[0]] == 2
    bm.free(ids)
    assert bm.num_free_blocks == 8 - 2
    bm.free(ids[:2])
    assert bm.num_free_blocks == 8


def test_freed_cached_blocks_stay_findable_until_reused():
    bm = BlockManager(4, 16)
    h = [BlockHash(bytes([i]) * 16) for i in range(4)]
    ids = bm.allocate(4)
    for i, hh in zip(ids, h):
        bm.register(i, hh)
    bm.free(ids)
    assert bm.match_prefix(h) == ids  # still cached while free
    bm.take(bm.match_prefix(h[:1]))  # revive the first block: it leaves the free list
    assert bm.num_free_blocks == 3
    fresh = bm.allocate(1)  # evicts the lowest id of the free run [1, 4)
    assert fresh == [ids[1]]
    assert bm.match_prefix(h) == ids[:1]  # the chain now breaks at block 1


def test_allocation_is_ascending_and_contiguous_on_a_fresh_pool():
    bm = BlockManager(64, 16)
    assert bm.allocate(5) == [0, 1, 2, 3, 4]
    assert bm.allocate(3) == [5, 6, 7]
    assert bm.num_free_runs == 1


def test_best_fit_run_and_runs_merge_in_both_directions():
    bm = BlockManager(32, 16)
    a, b, c, d = bm.allocate(4), bm.allocate(8), bm.allocate(3), bm.allocate(17)
    bm.free(b)  # hole of 8 at 4..11
    bm.free(d)  # tail run of 17 at 15..31
    assert bm.num_free_runs == 2
    assert bm.allocate(6) == list(range(4, 10))  # the smallest run that fits, from its low end
    bm.free(list(range(4, 10)))
    bm.free(c)  # 12..14 joins the hole on its left and the tail on its right: one run 4..31
    assert bm.num_free_runs == 1
    assert bm.allocate(28) == list(range(4, 32))
    bm.free(list(range(4, 32)))
    bm.free(list(reversed(a)))  # freeing order does not matter
    assert bm.num_free_runs == 1 and bm.num_free_blocks == 32


def test_no_fitting_run_takes_the_longest_runs_first():
    bm = BlockManager(16, 16)
    blocks = [bm.allocate(1)[0] for _ in range(16)]
    for b in (1, 2, 5, 6, 7, 10):  # free runs: [1, 2], [5, 6, 7], [10]
        bm.free([blocks[b]])
    assert bm.allocate(5) == [5, 6, 7, 1, 2]


def test_growth_extends_the_last_run_in_place():
    bm = BlockManager(16, 16)
    seq = bm.allocate(2)
    other = bm.allocate(2)
    bm.free(other)  # 2..15 free again
    assert bm.allocate(1, after=seq[-1]) == [2]
    blocker = bm.allocate(1)  # takes 3
    assert blocker == [3]
    assert bm.allocate(1, after=2) == [4]  # 3 is taken: no in-place growth, best fit elsewhere


def test_churn_keeps_runs_consistent_with_reference_counts():
    rng = random.Random(1)
    bm = BlockManager(256, 16)
    held: list[list[int]] = []
    for _ in range(2000):
        if held and (rng.random() < 0.5 or bm.num_free_blocks < 40):
            bm.free(held.pop(rng.randrange(len(held))))
        else:
            held.append(bm.allocate(rng.randint(1, 32)))
        free = [b for b in range(256) if bm.ref_counts[b] == 0]
        runs = sum(1 for i, b in enumerate(free) if i == 0 or free[i - 1] != b - 1)
        assert bm.num_free_blocks == len(free) and bm.num_free_runs == runs


def test_random_operations_never_leak():
    rng = random.Random(0)
    bm = BlockManager(32, 16)
    held: list[list[int]] = []
    for step in range(2000):
        op = rng.random()
        if op < 0.45 and bm.num_free_blocks:
            held.append(bm.allocate(rng.randint(1, bm.num_free_blocks)))
            if rng.random() < 0.5:
                bm.register(held[-1][0], BlockHash(step.to_bytes(16, "little")))
        elif op < 0.6 and held:
            blocks = rng.choice(held)
            cached = bm.match_prefix([bm.block_hashes[blocks[0]]]) if bm.block_hashes[blocks[0]] else []
            if cached:
                bm.take(cached)
                held.append(cached)
        elif held:
            bm.free(held.pop(rng.randrange(len(held))))
        assert bm.num_free_blocks == sum(1 for c in bm.ref_counts if c == 0)
    for blocks in held:
        bm.free(blocks)
    assert bm.num_free_blocks == 32


def test_chain_hash_changes_when_any_earlier_token_changes():
    tokens = list(range(100, 164))
    base = chain_block_hashes(tokens, 16, FP)
    assert len(base) == 4
    for pos in (0, 17, 40, 63):
        changed = list(tokens)
        changed[pos] += 1
        h = chain_block_hashes(changed, 16, FP)
        first_changed = pos // 16
        assert h[:first_changed] == base[:first_changed]
        assert all(a != b for a, b in zip(h[first_changed:], base[first_changed:]))


def test_chain_hash_depends_on_model_fingerprint_and_is_stable():
    tokens = list(range(32))
    assert chain_block_hashes(tokens, 16, FP) != chain_block_hashes(tokens, 16, b"another-model-00")
    # stable across processes and runs: a fixed value, never Python's randomized hash()
    assert hash_block(None, [1, 2, 3], b"x").hex() == hash_block(None, [1, 2, 3], b"x").hex()
    assert len(hash_block(None, [1], FP)) == 16


def test_chain_hash_reuses_known_prefix():
    tokens = list(range(80))
    full = chain_block_hashes(tokens, 16, FP)
    assert chain_block_hashes(tokens, 16, FP, known=full[:2]) == full


def test_empty_blocks_are_used_before_cached_ones_are_evicted():
    bm = BlockManager(16, 16)
    h = [BlockHash(bytes([i]) * 16) for i in range(4)]
    ids = bm.allocate(4)
    for i, hh in zip(ids, h):
        bm.register(i, hh)
    bm.free(ids)
    assert bm.allocate(12) == list(range(4, 16))  # the empty run, not the cached prefix
    assert bm.match_prefix(h) == ids
    assert bm.allocate(2) == ids[:2]  # then the cached ones, least recently freed first


def _cache_all(bm: BlockManager, ids: list[int], tag: int) -> None:
    for i, b in enumerate(ids):
        bm.register(b, BlockHash(bytes([tag, i]) * 8))


def test_eviction_takes_the_oldest_blocks_run_whole():
    """Cached blocks freed by different requests but adjacent in the pool are evicted as one run, starting
    from the least recently freed block: one region instead of one per earlier request."""
    bm = BlockManager(12, 16)
    a, b, c = bm.allocate(4), bm.allocate(4), bm.allocate(4)  # [0..3], [4..7], [8..11]
    for tag, ids in enumerate((a, b, c)):
        _cache_all(bm, ids, tag)
    bm.free(b)  # oldest
    bm.free(c)
    bm.free(a)  # youngest
    # LRU alone would take 4..7 then 8, 9 (two runs); run-aware takes the oldest block's run 4..9 in one
    assert bm.allocate(6) == [4, 5, 6, 7, 8, 9]
    assert bm.match_prefix([bm.block_hashes[x] for x in a]) == a  # the youngest request's blocks survive
    # then the next oldest (10, 11: the rest of c), then a's run from its oldest block
    assert bm.allocate(3) == [10, 11, 0]


def test_eviction_window_holds_the_oldest_block_and_never_a_used_one():
    bm = BlockManager(10, 16)
    ids = bm.allocate(10)
    _cache_all(bm, ids, 1)
    bm.free(ids[6:])  # 6..9 oldest
    bm.free(ids[:5])  # 0..4; block 5 stays in use
    got = bm.allocate(3)
    assert got == [6, 7, 8]  # the oldest block's run (6..9), from the oldest block
    got2 = bm.allocate(3)
    assert got2 == [9, 0, 1] and 5 not in got + got2
    assert bm.ref_counts[5] == 1 and bm.num_free_blocks == 3
