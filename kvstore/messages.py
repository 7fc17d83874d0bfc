"""Conversions between the store's protobuf messages (proto/kvstore.proto) and the value types of values.py."""

from __future__ import annotations

from pdserve.engine.block_hash import HASH_NBYTES, BlockHash
from pdserve.errors import InvalidRequest
from pdserve.proto import kvstore_pb2 as kpb

from .values import Location, NodeInfo, StoredValue, ValueMeta


def key_of(raw: bytes) -> BlockHash:
    if len(raw) != HASH_NBYTES:
        raise InvalidRequest(f"a key is {HASH_NBYTES} bytes, got {len(raw)}")
    return BlockHash(bytes(raw))


def meta_to_pb(meta: ValueMeta) -> kpb.ValueMeta:
    return kpb.ValueMeta(nbytes=meta.nbytes, dtype=meta.dtype, shape=list(meta.shape),
                         model_fingerprint=meta.fingerprint)


def meta_from_pb(msg: kpb.ValueMeta) -> ValueMeta:
    return ValueMeta(int(msg.nbytes), msg.dtype, tuple(int(d) for d in msg.shape), bytes(msg.model_fingerprint))


def node_to_pb(info: NodeInfo) -> kpb.NodeInfo:
    return kpb.NodeInfo(node_id=info.node_id, address=info.address, transfer_address=info.transfer_address,
                        capacity_bytes=info.capacity_bytes, slot_nbytes=info.slot_nbytes, ssd_bytes=info.ssd_bytes)


def node_from_pb(msg: kpb.NodeInfo) -> NodeInfo:
    if not msg.node_id or not msg.address or not msg.transfer_address:
        raise InvalidRequest("a node needs node_id, address and transfer_address")
    return NodeInfo(msg.node_id, msg.address, msg.transfer_address, int(msg.capacity_bytes), int(msg.slot_nbytes),
                    int(msg.ssd_bytes))


def value_to_pb(value: StoredValue) -> kpb.StoredValue:
    return kpb.StoredValue(key=value.key, offset=value.offset, meta=meta_to_pb(value.meta))


def value_from_pb(msg: kpb.StoredValue) -> StoredValue:
    return StoredValue(key_of(msg.key), int(msg.offset), meta_from_pb(msg.meta))


def location_to_pb(loc: Location) -> kpb.Location:
    return kpb.Location(key=loc.key, node=node_to_pb(loc.node), offset=loc.offset, meta=meta_to_pb(loc.meta))


def location_from_pb(msg: kpb.Location) -> Location:
    return Location(key_of(msg.key), node_from_pb(msg.node), int(msg.offset), meta_from_pb(msg.meta))
