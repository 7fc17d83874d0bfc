"""KV block allocator with reference counts and the prefix-cache index.

Free blocks that still hold a full block's KV stay findable by their chained hash until they are
reused, so a later request with the same prefix skips that compute. Free blocks live in two tiers:
empty ones (no cached KV) as runs of consecutive ids, and cached ones in least-recently-freed order.
Allocation is contiguity-first within the empty tier: the smallest run that fits (best fit, lowest
ids first, ascending), else the longest runs, and a growing sequence extends its last block's run
in place when it can; only when empty blocks run out are cached ones evicted, a run at a time: the
least recently freed block together with its free cached neighbours, so a request that evicts
several earlier requests' blocks still gets few runs. In the block-major KV layout a run is one
byte region, so a request's KV moves in about as many sends after churn as on a fresh pool, also
when every free block is cached (docs/kv_fragmentation.md). Owns block ids and counts; never
touches KV memory.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict

from pdserve.engine.block_hash import BlockHash


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[BlockHash | None] = [None] * num_blocks
        # free ids as runs of consecutive ids: sorted run starts, start -> run length
        self._run_starts: list[int] = [0] if num_blocks else []
        self._run_len: dict[int, int] = {0: num_blocks} if num_blocks else {}
        self._num_free = num_blocks  # in the empty runs
        # free blocks still holding cached KV, least recently freed first; values unused
        self._cached_free: OrderedDict[int, None] = OrderedDict()
        self.hash_to_block_id: dict[BlockHash, int] = {}
        self.num_prefix_queries = 0  # blocks looked up
        self.num_prefix_hits = 0  # blocks found

    @property
    def num_free_blocks(self) -> int:
        return self._num_free + len(self._cached_free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_free_runs(self) -> int:
        """Runs of consecutive empty free ids (1 on a fresh pool; grows with fragmentation)."""
        return len(self._run_starts)

    def is_free(self, block_id: int) -> bool:
        return self.ref_counts[block_id] == 0

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
                if b in self._cached_free:
                    del self._cached_free[b]
                else:
                    self._take_free_range(b, 1)
            self.ref_counts[b] += 1

    def allocate(self, num_blocks: int, after: int | None = None) -> list[int]:
        """Take `num_blocks` fresh blocks (evicting their old cached hashes), in as few runs of
        consecutive ids as the free list allows. `after`: the caller's last block; blocks right after
        it are taken first, so a growing sequence stays one run. Caller checks capacity."""
        if num_blocks > self.num_free_blocks:
            raise MemoryError(f"need {num_blocks} KV blocks, {self.num_free_blocks} free")
        block_ids: list[int] = []
        if after is not None and after + 1 in self._run_len:
            n = min(num_blocks, self._run_len[after + 1])
            block_ids.extend(self._take_free_range(after + 1, n))
        while len(block_ids) < num_blocks and self._num_free:
            want = num_blocks - len(block_ids)
            start = self._best_run(want)
            block_ids.extend(self._take_free_range(start, min(want, self._run_len[start])))
        if len(block_ids) < num_blocks:
            block_ids.extend(self._evict(num_blocks - len(block_ids)))
        for b in block_ids:
            old = self.block_hashes[b]
            if old is not None:
                if self.hash_to_block_id.get(old) == b:
                    del self.hash_to_block_id[old]
                self.block_hashes[b] = None
            self.ref_counts[b] = 1
        return block_ids

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; blocks reaching zero rejoin their neighbours' free runs."""
        for b in block_ids:
            assert self.ref_counts[b] > 0, f"double free of block {b}"
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                if self.block_hashes[b] is None or not self.enable_prefix_caching:
                    self.block_hashes[b] = None
                    self._add_free(b)
                else:
                    self._cached_free[b] = None

    def _evict(self, n: int) -> list[int]:
        """`n` cached free blocks, a run at a time: the least recently freed block together with the free
        cached blocks adjacent to it (ascending), so a request evicting several earlier requests' blocks
        still gets few runs. It costs a little LRU order (a run's younger neighbours go with its oldest
        block), never a block in use."""
        out: list[int] = []
        cached = self._cached_free
        while len(out) < n:
            oldest = next(iter(cached))
            lo, hi = oldest, oldest
            while lo - 1 in cached:
                lo -= 1
            while hi + 1 in cached:
                hi += 1
            want = n - len(out)
            start = max(lo, min(oldest, hi + 1 - want))  # a window of the run holding the oldest block
            for b in range(start, min(hi + 1, start + want)):
                del cached[b]
                out.append(b)
        return out

    # ---- free runs ------------------------------------------------------------------------------
    def _best_run(self, want: int) -> int:
        """Start of the smallest run holding `want` blocks (lowest id on ties), else of the longest run."""
        best, best_len, longest, longest_len = -1, 0, -1, 0
        for start in self._run_starts:
            n = self._run_len[start]
            if n >= want and (best < 0 or n < best_len):
                best, best_len = start, n
                if n == want:
                    break
            if n > longest_len:
                longest, longest_len = start, n
        return best if best >= 0 else longest

    def _take_free_range(self, first: int, count: int) -> range:
        """Remove [first, first + count) from the free runs (it must lie inside one run)."""
        k = bisect.bisect_right(self._run_starts, first) - 1
        assert k >= 0, f"block {first} is not free"
        start = self._run_starts[k]
        length = self._run_len[start]
        assert first + count <= start + length, f"blocks {first}..{first + count - 1} are not free"
        del self._run_len[start]
        tail_start, tail_len = first + count, start + length - first - count
        if first > start:
            self._run_len[start] = first - start
            if tail_len:
                self._run_starts.insert(k + 1, tail_start)
        elif tail_len:
            self._run_starts[k] = tail_start
        else:
            del self._run_starts[k]
        if tail_len:
            self._run_len[tail_start] = tail_len
        self._num_free -= count
        return range(first, first + count)

    def _add_free(self, b: int) -> None:
        k = bisect.bisect_right(self._run_starts, b)
        left = self._run_starts[k - 1] if k > 0 else -1
        merge_left = left >= 0 and left + self._run_len[left] == b
        merge_right = b + 1 in self._run_len
        if merge_left and merge_right:
            self._run_len[left] += 1 + self._run_len.pop(b + 1)
            del self._run_starts[k]
        elif merge_left:
            self._run_len[left] += 1
        elif merge_right:
            self._run_len[b] = 1 + self._run_len.pop(b + 1)
            self._run_starts[k] = b
        else:
            self._run_starts.insert(k, b)
            self._run_len[b] = 1
        self._num_free += 1

    def register(self, block_id: int, block_hash: BlockHash) -> None:
        """Mark a now-full block as holding the KV of `block_hash`, findable by later requests."""
        if not self.enable_prefix_caching or self.block_hashes[block_id] is not None:
            return
        if block_hash in self.hash_to_block_id:
            return  # another block already holds this content
        self.block_hashes[block_id] = block_hash
        self.hash_to_block_id[block_hash] = block_id
