"""The router's approximate prefix index: bounded by its capacity and by each worker's own KV pool."""

from __future__ import annotations

from pdserve.engine.block_hash import BlockHash
from pdserve.router.kv_index import PrefixIndex


def hashes(start: int, n: int) -> list[BlockHash]:
    return [BlockHash(i.to_bytes(16, "little")) for i in range(start, start + n)]


def test_a_worker_is_believed_to_hold_at_most_its_own_pool() -> None:
    index = PrefixIndex(capacity_blocks=100)
    index.record("w", hashes(0, 8), worker_num_blocks=4)
    assert index.match("w", hashes(0, 8)) == 0  # its first blocks fell out of a 4-block pool
    assert index.match("w", hashes(4, 4)) == 4


def test_unknown_pool_size_keeps_the_configured_capacity() -> None:
    index = PrefixIndex(capacity_blocks=6)
    index.record("w", hashes(0, 8))
    assert index.match("w", hashes(2, 6)) == 6 and index.match("w", hashes(0, 8)) == 0
    index.record("v", hashes(0, 3), worker_num_blocks=1000)  # the smaller of the two bounds wins
    assert index.match("v", hashes(0, 3)) == 3 and index.match("w", hashes(2, 2)) == 2
