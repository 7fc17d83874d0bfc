"""The node pool's tier bookkeeping: one slot space over DRAM and SSD frames, LRU demotion,
promotion, pins that keep a frame from being moved or reused, and checksums on the way back; and
NodeTiers' moves under concurrency."""

from __future__ import annotations

import asyncio
import zlib

import pytest

from pdserve.engine.block_hash import BlockHash
from pdserve.errors import InvalidRequest, Overloaded
from pdserve.kvstore.node_pool import NodePool
from pdserve.kvstore.node_tiers import NodeTiers
from pdserve.kvstore.values import StoredValue, ValueMeta

SLOT = 4096
META = ValueMeta(SLOT, "float32", (SLOT // 4,), b"fp")


def key(i: int) -> BlockHash:
    return BlockHash(i.to_bytes(16, "little"))


def value(i: int, slot: int) -> StoredValue:
    return StoredValue(key(i), slot * SLOT, META)


def pool(dram_frames: int = 2, ssd_frames: int = 4) -> NodePool:
    return NodePool(dram_frames * SLOT, SLOT, "host", ssd_frames * SLOT)


def write(p: NodePool, *values: StoredValue) -> list:
    regions = p.begin_write(values)
    p.commit(values, regions)
    return regions


def test_one_slot_space_over_both_tiers() -> None:
    p = pool(2, 4)
    assert (p.num_dram_frames, p.num_ssd_frames, p.num_slots) == (2, 4, 6)
    p.check_write([value(0, 5)])  # the last SSD slot is a slot like any other
    with pytest.raises(InvalidRequest):
        p.check_write([value(0, 6)])
    # a write lands in a DRAM frame whatever its slot
    (start, nbytes), = write(p, value(0, 5))
    assert start < 2 * SLOT and nbytes == SLOT


def test_full_dram_needs_room_then_lru_values_move_to_ssd() -> None:
    p = pool(2, 4)
    write(p, value(0, 0))
    write(p, value(1, 1))
    assert p.num_free_dram_frames == 0
    with pytest.raises(Overloaded):
        p.begin_write([value(2, 2)])
    assert p.pin_for_read(key(0)) is not None  # key 0 is now the most recent
    p.unpin([p._dram_of[0]])
    moves = p.begin_demotion(p.demotion_candidates(1))
    assert [m.key for m in moves] == [key(1)]  # least recently used first
    p.finish_demotion(moves, [123])
    assert p.on_ssd(key(1)) and not p.on_ssd(key(0)) and p.num_free_dram_frames == 1
    write(p, value(2, 2))
    assert p.num_values == 3 and (p.num_dram_values, p.num_ssd_values) == (2, 1)
    assert p.counters.num_demotions == 1


def test_pinned_frames_are_never_demoted_or_reused() -> None:
    p = pool(1, 2)
    write(p, value(0, 0))
    frame = p.pin_for_read(key(0))
    assert p.demotion_candidates(4) == []  # a reader holds it
    # the master reallocates the slot while the read is in flight: the frame is not reused yet
    with pytest.raises(Overloaded):
        p.begin_write([value(1, 0)])
    p.unpin([frame])
    regions = p.begin_write([value(1, 0)])
    assert regions[0][0] == frame * SLOT and p.get(key(0)) is None


def test_promotion_checks_the_checksum() -> None:
    p = pool(1, 2)
    write(p, value(0, 0))
    demoted = p.begin_demotion(p.demotion_candidates(1))
    p.finish_demotion(demoted, [777])
    good = p.begin_promotion([key(0)])
    assert [(m.key, m.crc) for m in good] == [(key(0), 777)]
    pinned = p.finish_promotion(good, [777])
    assert pinned == [good[0].dram_frame] and not p.on_ssd(key(0)) and p.counters.num_promotions == 1
    p.unpin(pinned)

    demoted = p.begin_demotion(p.demotion_candidates(1))
    p.finish_demotion(demoted, [777])
    bad = p.begin_promotion([key(0)])
    assert p.finish_promotion(bad, [778]) == []  # corrupt: dropped, never served
    assert p.get(key(0)) is None and p.counters.num_corrupt_reads == 1
    assert p.num_free_dram_frames == 1 and len(p._free_ssd) == 2  # nothing leaked


def test_failed_demotion_keeps_values_in_dram_and_overwrite_during_a_move_frees_everything() -> None:
    p = pool(3, 2)
    write(p, value(0, 0), value(1, 1))
    moves = p.begin_demotion(p.demotion_candidates(2))
    p.finish_demotion(moves, None)  # the SSD write failed
    assert p.num_dram_values == 2 and len(p._free_ssd) == 2

    moves = p.begin_demotion(p.demotion_candidates(1))
    new = [value(9, moves[0].slot)]
    p.commit(new, p.begin_write(new))  # the master gave the slot to a new value mid-move
    p.finish_demotion(moves, [1])
    assert not p.on_ssd(key(9)) and p.get(moves[0].key) is None and p.get(key(9)) is not None
    assert len(p._free_ssd) == 2  # the move's SSD frame came back
    assert p.num_free_dram_frames == 1  # and the old value's DRAM frame, once the move let go of it


def test_write_that_never_lands_frees_its_frame() -> None:
    p = pool(1, 0)
    values = [value(0, 0)]
    regions = p.begin_write(values)
    p.fail_write(values, regions)
    assert p.num_free_dram_frames == 1 and p.get(key(0)) is None


def test_no_ssd_tier_drops_lru_values_for_room() -> None:
    p = pool(2, 0)
    write(p, value(0, 0), value(1, 1))
    assert p.drop_for_room(1) == [key(0)] and p.num_free_dram_frames == 1


def test_tier_changes_queue_for_the_master_until_acknowledged() -> None:
    p = pool(1, 2)
    write(p, value(0, 0))
    assert p.tier_changes() == {}
    p.finish_demotion(p.begin_demotion(p.demotion_candidates(1)), [5])
    sent = p.tier_changes()
    assert sent == {key(0): True}
    pinned = p.finish_promotion(p.begin_promotion([key(0)]), [5])  # changes again before the ack
    p.unpin(pinned)
    p.ack_tier_changes(sent)
    assert p.tier_changes() == {key(0): False}  # the newer change stays queued
    p.ack_tier_changes(p.tier_changes())
    assert p.tier_changes() == {}
    p.finish_demotion(p.begin_demotion(p.demotion_candidates(1)), [6])
    p.ack_tier_changes(p.tier_changes())
    p.report_all_tiers()  # re-registered: the master assumes DRAM again
    assert p.tier_changes() == {key(0): True}


class SlowSSD:
    """The SSDTier surface NodeTiers uses; each write waits until `release` is set."""

    is_on = True

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.num_writes = 0

    async def write(self, runs) -> list[int]:
        self.num_writes += 1
        await self.release.wait()
        return [zlib.crc32(v) for _, views in runs for v in views]


async def test_a_write_during_a_demotion_does_not_take_the_frames_it_frees() -> None:
    p = pool(4, 8)
    for i in range(3):
        write(p, value(i, i))
    assert p.num_free_dram_frames == 1
    ssd = SlowSSD()
    tiers = NodeTiers(p, ssd, batch_blocks=1)
    first = asyncio.create_task(tiers.begin_write([value(10, 4), value(11, 5), value(12, 6)]))  # demotes 2
    await asyncio.sleep(0.01)
    assert ssd.num_writes == 1
    second = asyncio.create_task(tiers.begin_write([value(13, 7)]))  # one frame is free right now
    await asyncio.sleep(0.01)
    assert not second.done()  # queued behind the demotion, not holding the free frame
    ssd.release.set()
    regions = await asyncio.wait_for(first, 5)
    assert len(regions) == 3
    p.commit([value(10, 4), value(11, 5), value(12, 6)], regions)
    regions = await asyncio.wait_for(second, 5)  # made its own room: the last older value moved too
    p.commit([value(13, 7)], regions)
    assert p.num_values == 7 and p.num_ssd_values == 3
    assert all(p.on_ssd(key(i)) for i in range(3))
