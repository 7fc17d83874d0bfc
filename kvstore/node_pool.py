"""A store node's pool: the slots the master allocates, spread over two tiers, and the inventory of
which block value sits in which slot.

The master sees one slot space per node (`NodeInfo.num_slots`: DRAM slots, then SSD slots). Here a
slot's value lives in a DRAM *frame* (a slot-sized piece of `buffer`, the one buffer the transfer
layer moves bytes in and out of) or an SSD frame (a piece of the node's SSD file), never both.
Recently used values stay in DRAM; when a write needs a DRAM frame and none is free, the least
recently used DRAM values move to SSD (`demotion_candidates` / `begin_demotion` / `finish_demotion`),
and a read of an SSD value first copies it back up (`begin_promotion` / `finish_promotion`).
Frames being read or written are pinned: never moved or reused until unpinned. Pure bookkeeping:
node.py runs the transfers and the SSD I/O (node_ssd.py) these plans call for.
"""

from __future__ import annotations

import logging
import mmap
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pdserve.engine.block_hash import BlockHash
from pdserve.errors import InvalidRequest, Overloaded
from pdserve.transfer.regions import Region

from .values import StoredValue, num_dram_slots, num_ssd_slots

logger = logging.getLogger(__name__)


def allocate_buffer(nbytes: int, memory: str) -> object:
    """Host memory (numpy over an anonymous mmap: zeroed, touched lazily, page aligned, so the SSD tier
    can move frames with O_DIRECT) or device memory (cupy, only where a GPU and cupy exist)."""
    if memory == "host":
        return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8)
    try:
        import cupy
    except ImportError as exc:
        raise ValueError("--memory device needs cupy (pip install pdserve[gpu]) and a GPU") from exc
    if cupy.cuda.runtime.getDeviceCount() < 1:
        raise ValueError("--memory device: no GPU found")
    return cupy.zeros(nbytes, dtype=cupy.uint8)


@dataclass(frozen=True, slots=True)
class Move:
    """One value moving between tiers: logical `slot` holding `key`, its DRAM and SSD frames."""

    slot: int
    key: BlockHash
    dram_frame: int
    ssd_frame: int
    crc: int = 0  # the value's checksum on SSD (promotions)


@dataclass(slots=True)
class TierCounters:
    num_dram_hits: int = 0  # values served from DRAM
    num_ssd_hits: int = 0  # values served after a promotion from SSD
    num_demotions: int = 0  # DRAM -> SSD (the DRAM tier's evictions)
    num_dram_drops: int = 0  # DRAM values dropped for room with no SSD tier to take them
    num_ssd_evictions: int = 0  # SSD values whose slot the master gave to a new value
    num_promotions: int = 0
    num_corrupt_reads: int = 0  # SSD reads whose checksum failed: the value was dropped


class NodePool:
    def __init__(self, capacity_bytes: int, slot_nbytes: int = 0, memory: str = "host", ssd_bytes: int = 0) -> None:
        self.capacity_bytes = capacity_bytes  # DRAM tier
        self.ssd_bytes = ssd_bytes  # SSD tier (0: none, or turned off)
        self.slot_nbytes = 0
        self.buffer = allocate_buffer(capacity_bytes, memory)
        self.counters = TierCounters()
        self._values: dict[BlockHash, StoredValue] = {}  # committed: key -> slot (offset) and metadata
        self._slot_keys: dict[int, BlockHash] = {}  # slot -> committed key in it
        self._dram_of: dict[int, int] = {}  # slot -> DRAM frame (committed values and writes in flight)
        self._ssd_of: dict[int, tuple[int, int]] = {}  # slot -> (SSD frame, crc) of committed values on SSD
        # key -> on SSD now, for the values that changed tier since the master last heard (heartbeats carry it)
        self._tier_changes: dict[BlockHash, bool] = {}
        self._dram_lru: OrderedDict[int, None] = OrderedDict()  # slots of committed DRAM values, oldest first
        self._free_dram: list[int] = []
        self._free_ssd: list[int] = []
        self._pins: Counter[int] = Counter()  # DRAM frame -> readers/writers/moves using it
        self._orphans: set[int] = set()  # pinned DRAM frames whose value is gone: freed when unpinned
        if slot_nbytes:
            self._fix_slot_size(slot_nbytes)

    # ---- geometry ---------------------------------------------------------------------------------
    @property
    def num_values(self) -> int:
        return len(self._values)

    @property
    def num_dram_frames(self) -> int:
        return num_dram_slots(self.capacity_bytes, self.slot_nbytes)

    @property
    def num_ssd_frames(self) -> int:
        return num_ssd_slots(self.ssd_bytes, self.slot_nbytes)

    @property
    def num_slots(self) -> int:
        return self.num_dram_frames + self.num_ssd_frames

    @property
    def num_dram_values(self) -> int:
        return len(self._dram_lru)

    @property
    def num_ssd_values(self) -> int:
        return len(self._ssd_of)

    @property
    def num_pinned_frames(self) -> int:
        return len(self._pins)

    @property
    def num_free_dram_frames(self) -> int:
        return len(self._free_dram)

    def _fix_slot_size(self, slot_nbytes: int) -> None:
        self.slot_nbytes = slot_nbytes
        self._free_dram = list(reversed(range(self.num_dram_frames)))  # stacks, lowest index on top
        self._free_ssd = list(reversed(range(self.num_ssd_frames)))

    def turn_off_ssd(self) -> list[BlockHash]:
        """The SSD tier failed: its values are gone (returned) and no more demotions happen. The slot
        space stays as the master knows it; DRAM frames then make room by dropping (drop_for_room)."""
        lost = [self._slot_keys[slot] for slot in self._ssd_of]
        for key in lost:
            self._forget(key)
        self._free_ssd = []
        return lost

    def dram_view(self, frame: int) -> memoryview:
        start = frame * self.slot_nbytes
        return memoryview(self.buffer)[start:start + self.slot_nbytes]

    # ---- writes -----------------------------------------------------------------------------------
    def check_write(self, values: Sequence[StoredValue]) -> None:
        """Raises InvalidRequest on any size or slot problem; fixes the slot size on the first write."""
        if not values:
            raise InvalidRequest("no values to write")
        slot_nbytes = self.slot_nbytes or values[0].meta.nbytes
        num_slots = self.num_slots if self.slot_nbytes else (num_dram_slots(self.capacity_bytes, slot_nbytes)
                                                             + num_ssd_slots(self.ssd_bytes, slot_nbytes))
        seen: set[int] = set()
        for value in values:
            value.meta.check()
            if value.meta.nbytes > slot_nbytes:
                raise InvalidRequest(f"value of {value.meta.nbytes} B does not fit slots of {slot_nbytes} B")
            if value.offset % slot_nbytes or value.offset // slot_nbytes >= num_slots:
                raise InvalidRequest(f"offset {value.offset} is not one of this node's {num_slots} slots")
            slot = value.offset // slot_nbytes
            if slot in seen:
                raise InvalidRequest(f"slot {slot} written twice in one request")
            seen.add(slot)
        if not self.slot_nbytes:
            self._fix_slot_size(slot_nbytes)

    def begin_write(self, values: Sequence[StoredValue]) -> list[Region]:
        """Forgets what the slots (and older copies of the keys) held, since the master reallocated them,
        and gives each value a pinned DRAM frame; returns the regions of `buffer` to receive them.
        Raises Overloaded when too few DRAM frames are free (the caller makes room first)."""
        for value in values:
            self._forget(self._slot_keys.get(value.offset // self.slot_nbytes), evicted=True)
            self._forget(value.key)
            self._release_write_frame(value.offset // self.slot_nbytes)
        if len(self._free_dram) < len(values):
            raise Overloaded(f"store node: {len(values)} DRAM frames wanted, {len(self._free_dram)} free")
        regions: list[Region] = []
        for value in values:
            frame = self._free_dram.pop()
            self._pins[frame] += 1
            self._dram_of[value.offset // self.slot_nbytes] = frame
            regions.append((frame * self.slot_nbytes, value.meta.nbytes))
        return regions

    def commit(self, values: Sequence[StoredValue], regions: Sequence[Region]) -> None:
        """The write of `values` into `regions` (what begin_write returned) landed."""
        for value, (start, _) in zip(values, regions):
            slot, frame = value.offset // self.slot_nbytes, start // self.slot_nbytes
            self._unpin(frame)
            if self._dram_of.get(slot) != frame:
                continue  # the slot was reallocated while the bytes were landing (its frame is freed by now)
            self._values[value.key] = value
            self._slot_keys[slot] = value.key
            self._dram_lru[slot] = None

    def fail_write(self, values: Sequence[StoredValue], regions: Sequence[Region]) -> None:
        for value, (start, _) in zip(values, regions):
            slot, frame = value.offset // self.slot_nbytes, start // self.slot_nbytes
            if self._dram_of.get(slot) == frame:
                del self._dram_of[slot]
                self._free_dram_frame(frame)
            self._unpin(frame)

    def _release_write_frame(self, slot: int) -> None:
        """Frees the DRAM frame of an older write still in flight to `slot` (none committed there)."""
        if slot in self._slot_keys or slot not in self._dram_of:
            return
        self._free_dram_frame(self._dram_of.pop(slot))

    # ---- reads ------------------------------------------------------------------------------------
    def get(self, key: BlockHash) -> StoredValue | None:
        return self._values.get(key)

    def on_ssd(self, key: BlockHash) -> bool:
        value = self._values.get(key)
        return value is not None and value.offset // self.slot_nbytes in self._ssd_of

    def pin_for_read(self, key: BlockHash) -> int | None:
        """The DRAM frame of a committed DRAM value, pinned and made most recent; None when not in DRAM."""
        value = self._values.get(key)
        if value is None:
            return None
        slot = value.offset // self.slot_nbytes
        frame = self._dram_of.get(slot)
        if frame is None or slot not in self._dram_lru:
            return None
        self._dram_lru.move_to_end(slot)
        self._pins[frame] += 1
        return frame

    def unpin(self, frames: Sequence[int]) -> None:
        for frame in frames:
            self._unpin(frame)

    # ---- tier moves -------------------------------------------------------------------------------
    def demotion_candidates(self, n: int) -> list[int]:
        """Up to n least-recently-used slots of committed, unpinned DRAM values."""
        out: list[int] = []
        for slot in self._dram_lru:
            if len(out) == n:
                break
            if not self._pins[self._dram_of[slot]]:
                out.append(slot)
        return out

    def begin_demotion(self, slots: Sequence[int]) -> list[Move]:
        """SSD frames for these DRAM values (as many as are free); their DRAM frames stay pinned until
        finish_demotion, and the values stay readable from DRAM meanwhile."""
        moves: list[Move] = []
        for slot in slots:
            if not self._free_ssd:
                break
            frame = self._dram_of[slot]
            self._pins[frame] += 1
            moves.append(Move(slot, self._slot_keys[slot], frame, self._free_ssd.pop()))
        return moves

    def finish_demotion(self, moves: Sequence[Move], crcs: Sequence[int] | None) -> None:
        """crcs: one per move once written (None: the write failed, the values stay in DRAM)."""
        for i, move in enumerate(moves):
            self._unpin(move.dram_frame)
            still_here = self._slot_keys.get(move.slot) == move.key and self._dram_of.get(move.slot) == move.dram_frame
            if crcs is None or not still_here:
                self._free_ssd.append(move.ssd_frame)
                continue
            del self._dram_of[move.slot]
            self._dram_lru.pop(move.slot, None)
            self._ssd_of[move.slot] = (move.ssd_frame, crcs[i])
            self._free_dram_frame(move.dram_frame)
            self._tier_changes[move.key] = True
            self.counters.num_demotions += 1

    def drop_for_room(self, n: int) -> list[BlockHash]:
        """Without an SSD tier to take them: forgets up to n LRU unpinned DRAM values; returns their keys."""
        keys = [self._slot_keys[slot] for slot in self.demotion_candidates(n)]
        for key in keys:
            self._forget(key)
        self.counters.num_dram_drops += len(keys)
        return keys

    def begin_promotion(self, keys: Sequence[BlockHash]) -> list[Move]:
        """A pinned DRAM frame for each SSD value among `keys` (as many as are free), in order."""
        moves: list[Move] = []
        for key in keys:
            value = self._values.get(key)
            if value is None or not self._free_dram:
                continue
            slot = value.offset // self.slot_nbytes
            if slot not in self._ssd_of or slot in self._dram_of:
                continue
            frame = self._free_dram.pop()
            self._pins[frame] += 1
            self._dram_of[slot] = frame
            ssd_frame, crc = self._ssd_of[slot]
            moves.append(Move(slot, key, frame, ssd_frame, crc))
        return moves

    def finish_promotion(self, moves: Sequence[Move], crcs: Sequence[int] | None) -> list[int]:
        """Values whose bytes read back with their checksum move up to DRAM (their frames stay pinned for
        the reader: returned); the others are dropped (a failed read or a corrupt block is never served)."""
        pinned: list[int] = []
        for i, move in enumerate(moves):
            if self._dram_of.get(move.slot) != move.dram_frame or self._slot_keys.get(move.slot) != move.key:
                self._unpin(move.dram_frame)  # reallocated meanwhile: begin_write already took the frame back
                continue
            if crcs is None or crcs[i] != move.crc:
                if crcs is not None:
                    self.counters.num_corrupt_reads += 1
                    logger.error("SSD tier: block %s failed its checksum: dropped", move.key.hex())
                self._unpin(move.dram_frame)
                self._forget(move.key)
                continue
            self._free_ssd.append(self._ssd_of.pop(move.slot)[0])
            self._dram_lru[move.slot] = None
            self._tier_changes[move.key] = False
            self.counters.num_promotions += 1
            pinned.append(move.dram_frame)
        return pinned

    # ---- tier residency for the master -----------------------------------------------------------
    def tier_changes(self) -> dict[BlockHash, bool]:
        """A snapshot of the values that changed tier since the last `ack_tier_changes`: key -> on SSD now."""
        return dict(self._tier_changes)

    def ack_tier_changes(self, sent: dict[BlockHash, bool]) -> None:
        """The master took `sent`; changes made since stay queued."""
        for key, on_ssd in sent.items():
            if self._tier_changes.get(key) is on_ssd:
                del self._tier_changes[key]

    def report_all_tiers(self) -> None:
        """After (re)registering: the master assumes DRAM for everything, so queue every SSD value."""
        self._tier_changes = {self._slot_keys[slot]: True for slot in self._ssd_of if slot in self._slot_keys}

    # ---- inventory --------------------------------------------------------------------------------
    def _forget(self, key: BlockHash | None, evicted: bool = False) -> None:
        value = self._values.pop(key, None) if key is not None else None
        if value is None:
            return
        slot = value.offset // self.slot_nbytes
        self._slot_keys.pop(slot, None)
        self._dram_lru.pop(slot, None)
        frame = self._dram_of.pop(slot, None)
        if frame is not None:
            self._free_dram_frame(frame)
        ssd = self._ssd_of.pop(slot, None)
        if ssd is not None:
            self._free_ssd.append(ssd[0])
            self.counters.num_ssd_evictions += int(evicted)

    def _free_dram_frame(self, frame: int) -> None:
        if self._pins[frame]:
            self._orphans.add(frame)  # a reader or a move still uses it
        else:
            self._pins.pop(frame, None)
            self._free_dram.append(frame)

    def _unpin(self, frame: int) -> None:
        self._pins[frame] -= 1
        assert self._pins[frame] >= 0, f"frame {frame} unpinned more than pinned"
        if not self._pins[frame]:
            del self._pins[frame]
            if frame in self._orphans:
                self._orphans.discard(frame)
                self._free_dram.append(frame)

    def drop(self, keys: Sequence[BlockHash]) -> None:
        for key in keys:
            self._forget(key)

    def inventory(self) -> list[StoredValue]:
        return list(self._values.values())
