"""A store node's memory pool: one byte buffer cut into fixed-size slots, and the inventory of which
block value sits in which slot. The master chooses the slots; the pool checks every request
against its own geometry and metadata. No I/O (node.py moves the bytes through the transfer layer).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from pdserve.engine.block_hash import BlockHash
from pdserve.errors import InvalidRequest

from .values import StoredValue
from pdserve.transfer.regions import Region

logger = logging.getLogger(__name__)


def allocate_buffer(nbytes: int, memory: str) -> object:
    """Host memory (numpy) or device memory (cupy, only where a GPU and cupy exist)."""
    if memory == "host":
        return np.zeros(nbytes, dtype=np.uint8)
    try:
        import cupy
    except ImportError as exc:
        raise ValueError("--memory device needs cupy (pip install pdserve[gpu]) and a GPU") from exc
    if cupy.cuda.runtime.getDeviceCount() < 1:
        raise ValueError("--memory device: no GPU found")
    return cupy.zeros(nbytes, dtype=cupy.uint8)


class NodePool:
    def __init__(self, capacity_bytes: int, slot_nbytes: int = 0, memory: str = "host") -> None:
        self.capacity_bytes = capacity_bytes
        self.slot_nbytes = slot_nbytes  # 0 until the first write fixes it
        self.buffer = allocate_buffer(capacity_bytes, memory)
        self._values: dict[BlockHash, StoredValue] = {}  # committed: key -> where and what
        self._slot_keys: dict[int, BlockHash] = {}  # slot index -> committed key in it

    @property
    def num_values(self) -> int:
        return len(self._values)

    @property
    def num_slots(self) -> int:
        return self.capacity_bytes // self.slot_nbytes if self.slot_nbytes else 0

    def check_write(self, values: Sequence[StoredValue]) -> list[Region]:
        """The byte regions the values will occupy; raises InvalidRequest on any size or slot problem."""
        if not values:
            raise InvalidRequest("no values to write")
        slot_nbytes = self.slot_nbytes or values[0].meta.nbytes
        seen: set[int] = set()
        regions: list[Region] = []
        for value in values:
            value.meta.check()
            if value.meta.nbytes > slot_nbytes:
                raise InvalidRequest(f"value of {value.meta.nbytes} B does not fit slots of {slot_nbytes} B")
            if value.offset % slot_nbytes or value.offset + slot_nbytes > self.capacity_bytes:
                raise InvalidRequest(f"offset {value.offset} is not a slot of this {self.capacity_bytes} B pool")
            slot = value.offset // slot_nbytes
            if slot in seen:
                raise InvalidRequest(f"slot {slot} written twice in one request")
            seen.add(slot)
            regions.append((value.offset, value.meta.nbytes))
        self.slot_nbytes = slot_nbytes
        return regions

    def begin_write(self, values: Sequence[StoredValue]) -> None:
        """Forgets whatever the slots (and older copies of the keys) held: the master reallocated them."""
        for value in values:
            self._forget(self._slot_keys.get(value.offset // self.slot_nbytes))
            self._forget(value.key)

    def commit(self, values: Sequence[StoredValue]) -> None:
        for value in values:
            self._values[value.key] = value
            self._slot_keys[value.offset // self.slot_nbytes] = value.key

    def _forget(self, key: BlockHash | None) -> None:
        value = self._values.pop(key, None) if key is not None else None
        if value is not None:
            self._slot_keys.pop(value.offset // self.slot_nbytes, None)

    def drop(self, keys: Sequence[BlockHash]) -> None:
        for key in keys:
            self._forget(key)

    def get(self, key: BlockHash) -> StoredValue | None:
        return self._values.get(key)

    def inventory(self) -> list[StoredValue]:
        return list(self._values.values())
