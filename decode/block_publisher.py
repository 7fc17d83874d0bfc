"""Decode's generated KV blocks to the store as they fill, so a failover resumes from stored KV.

A hook on the engine thread (`LLMEngine.full_block_hook`) copies each newly full block that holds
generated tokens into the store client's staging buffer (one block copy; the step never waits on
the store); the event loop then puts what is queued in one background put at a time, batched. At
most `max_pending_blocks` are staged and not yet stored; beyond that blocks are dropped and
counted (a failover then recomputes from the first missing block). Prompt-only blocks are not
this module's: prefill (or decode's local prefill, `prefill/store_prefix.py`) publishes those.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass

from pdserve.engine.sequence import Sequence
from pdserve.kvstore.client import KVStoreClient, StagedBlocks

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class PublisherStats:
    num_staged_blocks: int = 0  # generated blocks copied to staging (engine thread)
    num_dropped_blocks: int = 0  # generated blocks not published: queue or staging full
    num_puts: int = 0  # background puts started (each carries every block queued when it started)
    stage_seconds: float = 0.0  # engine-thread time spent staging (the cost a decode step pays)


class GeneratedBlockPublisher:
    def __init__(self, store: KVStoreClient, block_size: int, loop: asyncio.AbstractEventLoop,
                 max_pending_blocks: int = 64, gather_s: float = 0.02) -> None:
        if max_pending_blocks < 1 or gather_s < 0:
            raise ValueError("max_pending_blocks must be >= 1 and gather_s >= 0")
        self.store = store
        self.block_size = block_size
        self.loop = loop
        self.max_pending_blocks = max_pending_blocks
        # a put waits this long for more blocks first: the sequences of a batch fill their blocks at about the
        # same step, and one put of many blocks costs the loop (and the store) far less than many of one each
        self.gather_s = gather_s
        self.stats = PublisherStats()
        # sequence -> leading blocks already handed on (engine thread only; a finished sequence drops out)
        self._done: weakref.WeakKeyDictionary[Sequence, int] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()  # guards _num_pending (engine thread adds, event loop subtracts)
        self._num_pending = 0
        self._queue: deque[StagedBlocks] = deque()  # event loop only
        self._flusher: asyncio.Task | None = None

    @property
    def num_pending_blocks(self) -> int:
        return self._num_pending

    # ---- engine thread ---------------------------------------------------------------------------
    def on_full_blocks(self, seq: Sequence, first: int) -> None:
        """`LLMEngine.full_block_hook`: blocks seq.block_table[first:seq.num_registered_blocks] just became
        full. Stages the ones holding generated tokens; never raises, never waits on the store."""
        started = time.perf_counter()
        try:
            start = max(first, seq.num_prompt_tokens // self.block_size, self._done.get(seq, 0))
            end = min(seq.num_registered_blocks, len(seq.block_hashes), len(seq.block_table))
            if end <= start:
                return
            self._done[seq] = end
            with self._lock:
                n = max(0, min(end - start, self.max_pending_blocks - self._num_pending))
                self._num_pending += n
            self.stats.num_dropped_blocks += end - start - n
            if n == 0:
                return
            staged = self.store.stage(seq.block_hashes[start:start + n], seq.block_table[start:start + n])
            num_staged = len(staged.slots) if staged is not None else 0
            self.stats.num_staged_blocks += num_staged
            self.stats.num_dropped_blocks += n - num_staged
            if num_staged < n:
                self._done_pending(n - num_staged)
            if staged is not None:
                self.loop.call_soon_threadsafe(self._enqueue, staged)
        except Exception:  # noqa: BLE001 - publishing is best effort; the step goes on
            logger.exception("[%s] staging generated blocks failed", seq.req_id)
        finally:
            self.stats.stage_seconds += time.perf_counter() - started

    def _done_pending(self, n: int) -> None:
        with self._lock:
            self._num_pending -= n

    # ---- event loop ------------------------------------------------------------------------------
    def _enqueue(self, staged: StagedBlocks) -> None:
        self._queue.append(staged)
        if self._flusher is None or self._flusher.done():
            self._flusher = self.loop.create_task(self._flush())

    async def _flush(self) -> None:
        """One put at a time, each carrying everything queued when it starts (a batch under load)."""
        while self._queue:
            if self.gather_s:
                await asyncio.sleep(self.gather_s)
            batch = list(self._queue)
            self._queue.clear()
            merged = StagedBlocks(tuple(h for s in batch for h in s.hashes), tuple(x for s in batch for x in s.slots))
            self.stats.num_puts += 1
            try:
                await self.store.put_staged(merged)  # never raises; frees the slots on every path
            finally:
                self._done_pending(len(merged.slots))

    async def wait_idle(self, timeout_s: float) -> None:
        """(tests, shutdown) Wait, bounded, until every staged block was put."""
        deadline = time.monotonic() + timeout_s
        while (self._queue or self._num_pending) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
