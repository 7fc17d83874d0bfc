"""KV block allocator with reference counts and the prefix-cache index.

Free blocks that still hold a full block's KV stay findable by their chained hash until they are
reused (least recently freed first), so a later request with the same prefix skips that compute.
Owns block ids and counts; never touches KV memory.
"""

from __future__ import annotations

from collections import OrderedDict

from pdserve.engine.block_hash import BlockHash


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[BlockHash | None] = [None] * num_blocks
        # free block ids in reuse order (least recently freed first); values unused
        self.free_block_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block_id: dict[BlockHash, int] = {}
        self.num_prefix_queries = 0  # blocks looked up
        self.num_prefix_hits = 0  # blocks found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_block_ids)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, block_hashes: list[BlockHash]) -> list[int]:
        """Block ids holding the longest cached prefix of `block_hashes`. No side effects."""
        if not self.enable_prefix_caching:
            return []
        block_ids = []
        for h in block_hashes:
            block_id = self.hash_to_block_id.get(h)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def record_prefix_query(self, num_queried: int, num_hit: int) -> None:
        self.num_prefix_queries += num_queried
        self.num_prefix_hits += num_hit

    def num_free_after_taking(self, cached_block_ids: list[int]) -> int:
        """Free blocks left if `cached_block_ids` were taken (free cached blocks leave the free list)."""
        return self.num_free_blocks - sum(1 for b in cached_block_ids if self.ref_counts[b] == 0)

    def take(self, block_ids: list[int]) -> None:
        """Add a reference to blocks already holding wanted KV (prefix-cache hits)."""
        for b in block_ids:
            if self.ref_counts[b] == 0:
                del self.free_block_ids[b]
            self.ref_counts[b] += 1

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` fresh blocks (evicting their old cached hashes). Caller checks capacity."""
        if num_blocks > self.num_free_blocks:
            raise MemoryError(f"need {num_blocks} KV blocks, {self.num_free_blocks} free")
        block_ids = []
        for _ in range(num_blocks):
            b, _ = self.free_block_ids.popitem(last=False)
            old = self.block_hashes[b]
            if old is not None:
                if self.hash_to_block_id.get(old) == b:
                    del self.hash_to_block_id[old]
                self.block_hashes[b] = None
            self.ref_counts[b] = 1
            block_ids.append(b)
        return block_ids

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block. Tail blocks are freed first so they are reused first."""
        for b in reversed(block_ids):
            assert self.ref_counts[b] > 0, f"double free of block {b}"
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                if self.block_hashes[b] is None or not self.enable_prefix_caching:
                    self.block_hashes[b] = None
                self.free_block_ids[b] = None

    def register(self, block_id: int, block_hash: BlockHash) -> None:
        """Mark a now-full block as holding the KV of `block_hash`, findable by later requests."""
        if not self.enable_prefix_caching or self.block_hashes[block_id] is not None:
            return
        if block_hash in self.hash_to_block_id:
            return  # another block already holds this content
        self.block_hashes[block_id] = block_hash
        self.hash_to_block_id[block_hash] = block_id
