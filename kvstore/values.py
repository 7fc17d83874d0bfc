"""The KV store's shared value types: what a stored value is (ValueMeta), where one sits on a node (StoredValue,
Location) and what a node is (NodeInfo). Immutable data, no logic beyond ValueMeta's size check; the master, the
nodes, the client and the protobuf conversions (messages.py) all speak these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdserve.engine.block_hash import BlockHash
from pdserve.errors import InvalidRequest

SSD_ALIGN = 4096  # bytes: an SSD-tier frame is a slot rounded up to this, so every frame starts aligned (O_DIRECT)
DTYPE_NBYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "uint8": 1}


@dataclass(frozen=True, slots=True)
class ValueMeta:
    """What one stored value is: `nbytes` bytes of `dtype` in `shape`, computed by the model `fingerprint`."""

    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    fingerprint: bytes

    def check(self) -> None:
        """Raises InvalidRequest unless nbytes == prod(shape) * dtype size."""
        if self.dtype not in DTYPE_NBYTES:
            raise InvalidRequest(f"unknown dtype {self.dtype!r}")
        if self.nbytes <= 0 or self.nbytes != math.prod(self.shape) * DTYPE_NBYTES[self.dtype]:
            raise InvalidRequest(f"value of {self.nbytes} bytes does not match {self.dtype}{list(self.shape)}")


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: str
    address: str  # gRPC control address host:port
    transfer_address: str  # UCX listener host:port
    capacity_bytes: int  # memory (DRAM) tier
    slot_nbytes: int  # 0: not fixed yet (the first value placed on the node fixes it)
    ssd_bytes: int = 0  # SSD tier (0: none)

    def num_slots(self, slot_nbytes: int) -> int:
        """Slots of both tiers at this slot size: the node's one slot space, which the master allocates."""
        return num_dram_slots(self.capacity_bytes, slot_nbytes) + num_ssd_slots(self.ssd_bytes, slot_nbytes)


def num_dram_slots(capacity_bytes: int, slot_nbytes: int) -> int:
    return capacity_bytes // slot_nbytes if slot_nbytes else 0


def num_ssd_slots(ssd_bytes: int, slot_nbytes: int) -> int:
    return ssd_bytes // ssd_frame_nbytes(slot_nbytes) if slot_nbytes else 0


def ssd_frame_nbytes(slot_nbytes: int) -> int:
    return -(-slot_nbytes // SSD_ALIGN) * SSD_ALIGN


@dataclass(frozen=True, slots=True)
class StoredValue:
    """One inventory line of a node: `key` is in the slot at byte `offset`."""

    key: BlockHash
    offset: int
    meta: ValueMeta


@dataclass(frozen=True, slots=True)
class Location:
    """Where one copy of a value lives (a put's destination or a get's source)."""

    key: BlockHash
    node: NodeInfo
    offset: int
    meta: ValueMeta
