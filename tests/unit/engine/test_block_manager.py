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


def test_freed_cached_blocks_stay_findable_until_reused_lru():
    bm = BlockManager(4, 16)
    h = [BlockHash(bytes([i]) * 16) for i in range(4)]
    ids = bm.allocate(4)
    for i, hh in zip(ids, h):
        bm.register(i, hh)
    bm.free(ids)
    assert bm.match_prefix(h) == ids  # still cached while free
    bm.take(bm.match_prefix(h[:1]))  # revive the first block: it leaves the free list
    assert bm.num_free_blocks == 3
    fresh = bm.allocate(1)  # evicts one freed block (the tail block was freed first)
    assert fresh == [ids[3]]
    assert bm.match_prefix(h) == ids[:3]


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
