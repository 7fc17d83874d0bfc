"""Decode's generated KV blocks to the store as they fill, so a failover resumes from stored KV.

A hook on the engine thread (`LLMEngine.full_block_hook`) copies each newly full block that holds
generated tokens into the store client's staging buffer (one block copy; the step never waits on
the store); the event loop then puts what is queued in one background put at a time, batched. At
most `max_pending_blocks` are staged and not yet stored; beyond that blocks are dropped and
counted (a failover then recomputes from the first missing block). Prompt-only blocks are not
this module's: prefill (or decode's local prefill, `prefill/store_prefix.py`) publishes those.

A put starts a few milliseconds after the loop sees a staged block (the rest of that engine step's
blocks join it); blocks staged while a put is in flight go together in the next one. The
window from staging to the end of the put is what a failover at that moment loses: `wait_settled` lets
the stream hold a request's next token until its staged blocks are settled (stored, or given up), so
that a failover never recomputes more than the last block.
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
    num_settled_blocks: int = 0  # staged blocks whose put finished (stored or not)
    settle_seconds: float = 0.0  # summed over those: staging -> end of its put (a failover's loss window)
    num_holds: int = 0  # stream messages held by wait_settled until their request's blocks settled
    hold_seconds: float = 0.0  # summed time those messages were held
    num_hold_timeouts: int = 0  # holds that gave up at their bound


class GeneratedBlockPublisher:
    def __init__(self, store: KVStoreClient, block_size: int, loop: asyncio.AbstractEventLoop,
                 max_pending_blocks: int = 64, gather_s: float = 0.005) -> None:
        if max_pending_blocks < 1 or gather_s < 0:
            raise ValueError("max_pending_blocks must be >= 1 and gather_s >= 0")
        self.store = store
        self.block_size = block_size
        self.loop = loop
        self.max_pending_blocks = max_pending_blocks
        # a put first waits this long for the rest of the step's blocks (the engine thread stages a batch's blocks
        # one sequence at a time; tiny model, 16 sequences: 18-35 puts per 144 blocks with no wait, 9-18 with 5 ms,
        # 9-10 with 20 ms, at about the same staging -> stored time as 5 ms); blocks arriving during a put go
        # in the next
        self.gather_s = gather_s
        self.stats = PublisherStats()
        self.recent_settle_s: deque[float] = deque(maxlen=4096)  # per block, staging -> end of its put (benchmarks)
        # sequence -> leading blocks already handed on (engine thread only; a finished sequence drops out)
        self._done: weakref.WeakKeyDictionary[Sequence, int] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()  # guards _num_pending, _unsettled (engine thread adds, event loop subtracts)
        self._num_pending = 0
        self._unsettled: dict[str, int] = {}  # request id -> its blocks staged and not yet settled
        self._queue: deque[tuple[StagedBlocks, str, float]] = deque()  # (blocks, request id, staged at); loop only
        self._flusher: asyncio.Task | None = None
        self._settled = asyncio.Event()  # replaced by a fresh one each time a put finishes (event loop)

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
                with self._lock:  # before the step's outputs reach the stream, so a hold sees these blocks
                    self._unsettled[seq.req_id] = self._unsettled.get(seq.req_id, 0) + num_staged
                self.loop.call_soon_threadsafe(self._enqueue, staged, seq.req_id, time.perf_counter())
        except Exception:  # noqa: BLE001 - publishing is best effort; the step goes on
            logger.exception("[%s] staging generated blocks failed", seq.req_id)
        finally:
            self.stats.stage_seconds += time.perf_counter() - started

    def _done_pending(self, n: int) -> None:
        with self._lock:
            self._num_pending -= n

    # ---- event loop ------------------------------------------------------------------------------
    def _enqueue(self, staged: StagedBlocks, req_id: str, staged_at: float) -> None:
        self._queue.append((staged, req_id, staged_at))
        if self._flusher is None or self._flusher.done():
            self._flusher = self.loop.create_task(self._flush())

    async def _flush(self) -> None:
        """One put at a time, each carrying everything queued when it starts (a batch under load)."""
        while self._queue:
            await asyncio.sleep(self.gather_s)  # 0: one pass of the loop, for the rest of the same step's blocks
            batch = list(self._queue)
            self._queue.clear()
            merged = StagedBlocks(tuple(h for s, _, _ in batch for h in s.hashes),
                                  tuple(x for s, _, _ in batch for x in s.slots))
            self.stats.num_puts += 1
            try:
                await self.store.put_staged(merged)  # never raises; frees the slots on every path
            finally:
                self._done_pending(len(merged.slots))
                self._settle(batch)

    def _settle(self, batch: list[tuple[StagedBlocks, str, float]]) -> None:
        now = time.perf_counter()
        with self._lock:
            for staged, req_id, _ in batch:
                left = self._unsettled.get(req_id, 0) - len(staged.slots)
                if left > 0:
                    self._unsettled[req_id] = left
                else:
                    self._unsettled.pop(req_id, None)
        for staged, _, staged_at in batch:
            self.stats.num_settled_blocks += len(staged.slots)
            self.stats.settle_seconds += len(staged.slots) * (now - staged_at)
            self.recent_settle_s.extend([now - staged_at] * len(staged.slots))
        settled, self._settled = self._settled, asyncio.Event()
        settled.set()

    def has_unsettled(self, req_id: str) -> bool:
        return req_id in self._unsettled

    async def wait_settled(self, req_id: str, timeout_s: float) -> bool:
        """(event loop) Wait, at most timeout_s, until every block staged for req_id so far is settled: stored,
        or its put failed. False when the bound was reached first (counted)."""
        if req_id not in self._unsettled:
            return True
        started = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        self.stats.num_holds += 1
        try:
            while req_id in self._unsettled:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.stats.num_hold_timeouts += 1
                    return False
                try:
                    await asyncio.wait_for(self._settled.wait(), left)
                except TimeoutError:
                    pass
            return True
        finally:
            self.stats.hold_seconds += time.perf_counter() - started

    async def wait_idle(self, timeout_s: float) -> None:
        """(tests, shutdown) Wait, bounded, until every staged block was put."""
        deadline = time.monotonic() + timeout_s
        while (self._queue or self._num_pending) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
