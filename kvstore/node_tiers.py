"""Moves a store node's values between its tiers: makes DRAM room for writes by demoting the least
recently used values to the SSD tier in batches, and promotes SSD values back to DRAM before they
are read. Runs node_pool.py's plans with node_ssd.py's I/O, one move at a time (a lock: one disk);
never touches transfers or the master (node.py does).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from pdserve.proto import kvstore_pb2 as kpb
from pdserve.transfer.regions import Region

from .node_pool import Move, NodePool
from .node_ssd import SSDTier, runs_of
from .values import StoredValue

logger = logging.getLogger(__name__)


class NodeTiers:
    def __init__(self, pool: NodePool, ssd: SSDTier | None, batch_blocks: int) -> None:
        self.pool = pool
        self.ssd = ssd
        self.batch_blocks = batch_blocks  # values demoted per SSD write, at least
        self._lock = asyncio.Lock()

    @property
    def ssd_on(self) -> bool:
        return self.ssd is not None and self.ssd.is_on

    def fixed_slot_size(self) -> None:
        """After a write fixed the pool's slot size: size the SSD frames to match."""
        if self.ssd is not None and not self.ssd.frame_nbytes and self.pool.slot_nbytes:
            self.ssd.fix_frame_size(self.pool.slot_nbytes, self.pool.buffer.ctypes.data)

    # ---- writes -----------------------------------------------------------------------------------
    async def begin_write(self, values: Sequence[StoredValue]) -> list[Region]:
        """Pinned DRAM regions for the values, making room first when DRAM is full.

        Only takes free frames directly while no move is under way: a write arriving during a demotion
        queues behind it rather than take the frames that demotion is freeing for the write before it
        (which then found too few and was refused: thousands of lost blocks in a trace replay)."""
        n = len(values)
        if self.pool.num_free_dram_frames >= n and not self._lock.locked():
            return self.pool.begin_write(values)
        async with self._lock:
            while self.pool.num_free_dram_frames < n:
                before = self.pool.num_free_dram_frames
                await self._make_dram_room(n)
                if self.pool.num_free_dram_frames <= before:
                    break  # nothing movable (pinned, or no SSD frame free): begin_write refuses
            return self.pool.begin_write(values)

    async def _make_dram_room(self, n: int) -> None:
        want = n - self.pool.num_free_dram_frames
        if want <= 0:
            return
        if self.ssd_on:
            await self._demote(max(want, self.batch_blocks))
        if self.pool.num_free_dram_frames < n and not self.ssd_on:
            self.pool.drop_for_room(n - self.pool.num_free_dram_frames)

    async def _demote(self, n: int) -> None:
        moves = sorted(self.pool.begin_demotion(self.pool.demotion_candidates(n)), key=lambda m: m.ssd_frame)
        if not moves:
            return
        views = [self.pool.dram_view(m.dram_frame) for m in moves]
        try:
            crcs = await self.ssd.write(runs_of([m.ssd_frame for m in moves], views))
        except OSError as exc:
            self.pool.finish_demotion(moves, None)
            self._ssd_failed(f"write failed: {exc}")
            return
        self.pool.finish_demotion(moves, crcs)

    # ---- reads ------------------------------------------------------------------------------------
    async def pin_for_read(self, values: Sequence[StoredValue]) -> list[int | None]:
        """Per asked value, the pinned DRAM frame holding it (None: not held here), promoting SSD values
        first. The caller unpins the frames once the readers are done."""
        on_ssd = [v.key for v in values if self.pool.on_ssd(v.key)]
        promoted: list[int] = []
        if on_ssd and self.ssd_on:
            async with self._lock:
                promoted = await self._promote(on_ssd)
        frames = [self.pool.pin_for_read(value.key) for value in values]
        self.pool.unpin(promoted)  # the readers' own pins hold them now
        from_ssd = set(promoted)
        num_from_ssd = sum(1 for f in frames if f is not None and f in from_ssd)
        self.pool.counters.num_ssd_hits += num_from_ssd
        self.pool.counters.num_dram_hits += sum(1 for f in frames if f is not None) - num_from_ssd
        return frames

    async def _promote(self, keys: list[bytes]) -> list[int]:
        keys = [k for k in keys if self.pool.on_ssd(k)]  # another read may have promoted them meanwhile
        if not keys:
            return []
        await self._make_dram_room(len(keys))
        moves: list[Move] = sorted(self.pool.begin_promotion(keys), key=lambda m: m.ssd_frame)
        if not moves:
            return []
        views = [self.pool.dram_view(m.dram_frame) for m in moves]
        try:
            crcs = await self.ssd.read(runs_of([m.ssd_frame for m in moves], views))
        except OSError as exc:
            self.pool.finish_promotion(moves, None)
            self._ssd_failed(f"read failed: {exc}")
            return []
        return self.pool.finish_promotion(moves, crcs)

    def _ssd_failed(self, reason: str) -> None:
        self.ssd.turn_off(reason)
        lost = self.pool.turn_off_ssd()
        logger.error("SSD tier: %d values on it are gone; the node continues with DRAM only", len(lost))

    # ---- stats ------------------------------------------------------------------------------------
    def stats(self) -> kpb.NodeTiers:
        pool, c = self.pool, self.pool.counters
        ssd = kpb.TierStats(num_slots=pool.num_ssd_frames if self.ssd_on else 0, num_values=pool.num_ssd_values,
                            num_hits=c.num_ssd_hits, num_evictions=c.num_ssd_evictions)
        if self.ssd is not None:
            k = self.ssd.counters
            ssd.bytes_read, ssd.bytes_written = k.bytes_read, k.bytes_written
            ssd.read_seconds, ssd.write_seconds = k.read_seconds, k.write_seconds
            ssd.off_reason = self.ssd.off_reason
        return kpb.NodeTiers(
            dram=kpb.TierStats(num_slots=pool.num_dram_frames, num_values=pool.num_dram_values,
                               num_hits=c.num_dram_hits, num_evictions=c.num_demotions + c.num_dram_drops,
                               num_pinned=pool.num_pinned_frames),
            ssd=ssd, num_promotions=c.num_promotions, num_corrupt_reads=c.num_corrupt_reads)
