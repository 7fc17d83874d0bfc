"""KV-aware worker choice: which prefill worker is expected to reach a prompt's first token
soonest, given what it (probably) has cached, what the store holds, and its queue.

The router keeps an approximate index of the block hashes it has sent to each prefill worker
(bounded LRU per worker: a worker's own prefix cache evicts too, so this is an estimate), and asks
the store master how long a prefix it holds. The cost model (a TTFT estimate, as Mooncake's
conductor does):

    ttft(w) = s_per_token * (queued_tokens(w)                 # prompt tokens already sent to w
                             + len(prompt) - cached(w)         # what w must compute
                             + load_cost * from_store(w))      # what w must load from the store

    cached(w)     = block_size * max(local(w), stored)        # local(w): index match, stored: master
    from_store(w) = block_size * max(0, stored - local(w))

`s_per_token` is w's prefill seconds per computed token as the router learnt it (router/worker_speed.py);
`load_cost` is the cost of loading one token's KV relative to computing it (default 0.1).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from pdserve.engine.block_hash import BlockHash


class PrefixIndex:
    """Per worker, the block hashes recently prefilled there (LRU, bounded by `capacity_blocks` and by
    the worker's own KV pool: a worker cannot hold more blocks than it has, so remembering more would
    promise local hits that only the store can give)."""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = capacity_blocks
        self._by_worker: dict[str, OrderedDict[BlockHash, None]] = {}  # worker address -> hashes

    def match(self, worker: str, hashes: list[BlockHash]) -> int:
        """Leading blocks of `hashes` that `worker` is believed to hold."""
        seen = self._by_worker.get(worker)
        if not seen:
            return 0
        n = 0
        for h in hashes:
            if h not in seen:
                break
            n += 1
        return n

    def record(self, worker: str, hashes: list[BlockHash], worker_num_blocks: int = 0) -> None:
        """`worker_num_blocks`: the worker's KV pool size (0: unknown, only `capacity_blocks` bounds it)."""
        seen = self._by_worker.setdefault(worker, OrderedDict())
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        limit = min(self.capacity, worker_num_blocks) if worker_num_blocks else self.capacity
        while len(seen) > limit:
            seen.popitem(last=False)

    def forget(self, worker: str) -> None:
        self._by_worker.pop(worker, None)


@dataclass(slots=True)
class PrefillChoice:
    address: str
    estimated_ttft_s: float
    cached_tokens: int
    store_tokens: int


def estimate(prompt_len: int, block_size: int, queued_tokens: int, local_blocks: int, stored_blocks: int,
             s_per_token: float, load_cost: float) -> tuple[float, int, int]:
    """(estimated TTFT seconds, cached tokens, tokens to load from the store) for one worker."""
    cap = (prompt_len - 1) // block_size  # the last token's block is always computed
    local = min(local_blocks, cap)
    stored = min(stored_blocks, cap)
    cached = block_size * max(local, stored)
    from_store = block_size * max(0, stored - local)
    ttft = s_per_token * (queued_tokens + prompt_len - cached + load_cost * from_store)
    return ttft, cached, from_store
