from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ValueMeta(_message.Message):
    __slots__ = ("nbytes", "dtype", "shape", "model_fingerprint")
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    nbytes: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    model_fingerprint: bytes
    def __init__(self, nbytes: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., model_fingerprint: _Optional[bytes] = ...) -> None: ...

class StoredValue(_message.Message):
    __slots__ = ("key", "offset", "meta")
    KEY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    offset: int
    meta: ValueMeta
    def __init__(self, key: _Optional[bytes] = ..., offset: _Optional[int] = ..., meta: _Optional[_Union[ValueMeta, _Mapping]] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "address", "transfer_address", "capacity_bytes", "slot_nbytes", "ssd_bytes")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SLOT_NBYTES_FIELD_NUMBER: _ClassVar[int]
    SSD_BYTES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    transfer_address: str
    capacity_bytes: int
    slot_nbytes: int
    ssd_bytes: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., transfer_address: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., slot_nbytes: _Optional[int] = ..., ssd_bytes: _Optional[int] = ...) -> None: ...

class RegisterNodeRequest(_message.Message):
    __slots__ = ("node", "inventory")
    NODE_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    inventory: _containers.RepeatedCompositeFieldContainer[StoredValue]
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ..., inventory: _Optional[_Iterable[_Union[StoredValue, _Mapping]]] = ...) -> None: ...

class RegisterNodeResponse(_message.Message):
    __slots__ = ("rejected_keys", "heartbeat_interval_s")
    REJECTED_KEYS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    rejected_keys: _containers.RepeatedScalarFieldContainer[bytes]
    heartbeat_interval_s: float
    def __init__(self, rejected_keys: _Optional[_Iterable[bytes]] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "tiers", "ssd_keys", "dram_keys")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    SSD_KEYS_FIELD_NUMBER: _ClassVar[int]
    DRAM_KEYS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    tiers: NodeTiers
    ssd_keys: _containers.RepeatedScalarFieldContainer[bytes]
    dram_keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, node_id: _Optional[str] = ..., tiers: _Optional[_Union[NodeTiers, _Mapping]] = ..., ssd_keys: _Optional[_Iterable[bytes]] = ..., dram_keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("num_slots", "num_values", "num_hits", "num_evictions", "bytes_read", "bytes_written", "read_seconds", "write_seconds", "off_reason", "num_pinned")
    NUM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    NUM_VALUES_FIELD_NUMBER: _ClassVar[int]
    NUM_HITS_FIELD_NUMBER: _ClassVar[int]
    NUM_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    READ_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WRITE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OFF_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_PINNED_FIELD_NUMBER: _ClassVar[int]
    num_slots: int
    num_values: int
    num_hits: int
    num_evictions: int
    bytes_read: int
    bytes_written: int
    read_seconds: float
    write_seconds: float
    off_reason: str
    num_pinned: int
    def __init__(self, num_slots: _Optional[int] = ..., num_values: _Optional[int] = ..., num_hits: _Optional[int] = ..., num_evictions: _Optional[int] = ..., bytes_read: _Optional[int] = ..., bytes_written: _Optional[int] = ..., read_seconds: _Optional[float] = ..., write_seconds: _Optional[float] = ..., off_reason: _Optional[str] = ..., num_pinned: _Optional[int] = ...) -> None: ...

class NodeTiers(_message.Message):
    __slots__ = ("dram", "ssd", "num_promotions", "num_corrupt_reads")
    DRAM_FIELD_NUMBER: _ClassVar[int]
    SSD_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_CORRUPT_READS_FIELD_NUMBER: _ClassVar[int]
    dram: TierStats
    ssd: TierStats
    num_promotions: int
    num_corrupt_reads: int
    def __init__(self, dram: _Optional[_Union[TierStats, _Mapping]] = ..., ssd: _Optional[_Union[TierStats, _Mapping]] = ..., num_promotions: _Optional[int] = ..., num_corrupt_reads: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BatchLookupRequest(_message.Message):
    __slots__ = ("keys", "model_fingerprint")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    model_fingerprint: bytes
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., model_fingerprint: _Optional[bytes] = ...) -> None: ...

class BatchLookupResponse(_message.Message):
    __slots__ = ("num_stored_prefix",)
    NUM_STORED_PREFIX_FIELD_NUMBER: _ClassVar[int]
    num_stored_prefix: int
    def __init__(self, num_stored_prefix: _Optional[int] = ...) -> None: ...

class Location(_message.Message):
    __slots__ = ("key", "node", "offset", "meta")
    KEY_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    node: NodeInfo
    offset: int
    meta: ValueMeta
    def __init__(self, key: _Optional[bytes] = ..., node: _Optional[_Union[NodeInfo, _Mapping]] = ..., offset: _Optional[int] = ..., meta: _Optional[_Union[ValueMeta, _Mapping]] = ...) -> None: ...

class Copies(_message.Message):
    __slots__ = ("copies",)
    COPIES_FIELD_NUMBER: _ClassVar[int]
    copies: _containers.RepeatedCompositeFieldContainer[Location]
    def __init__(self, copies: _Optional[_Iterable[_Union[Location, _Mapping]]] = ...) -> None: ...

class PutStartRequest(_message.Message):
    __slots__ = ("keys", "meta")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    meta: ValueMeta
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., meta: _Optional[_Union[ValueMeta, _Mapping]] = ...) -> None: ...

class PutStartResponse(_message.Message):
    __slots__ = ("put_id", "placements", "already_stored", "refused", "expires_in_s")
    PUT_ID_FIELD_NUMBER: _ClassVar[int]
    PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    ALREADY_STORED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    put_id: str
    placements: _containers.RepeatedCompositeFieldContainer[Copies]
    already_stored: _containers.RepeatedScalarFieldContainer[bytes]
    refused: _containers.RepeatedScalarFieldContainer[bytes]
    expires_in_s: float
    def __init__(self, put_id: _Optional[str] = ..., placements: _Optional[_Iterable[_Union[Copies, _Mapping]]] = ..., already_stored: _Optional[_Iterable[bytes]] = ..., refused: _Optional[_Iterable[bytes]] = ..., expires_in_s: _Optional[float] = ...) -> None: ...

class PutCommitRequest(_message.Message):
    __slots__ = ("put_id", "failed_node_ids")
    PUT_ID_FIELD_NUMBER: _ClassVar[int]
    FAILED_NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    put_id: str
    failed_node_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, put_id: _Optional[str] = ..., failed_node_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class PutCommitResponse(_message.Message):
    __slots__ = ("num_committed",)
    NUM_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    num_committed: int
    def __init__(self, num_committed: _Optional[int] = ...) -> None: ...

class PutAbortRequest(_message.Message):
    __slots__ = ("put_id",)
    PUT_ID_FIELD_NUMBER: _ClassVar[int]
    put_id: str
    def __init__(self, put_id: _Optional[str] = ...) -> None: ...

class PutAbortResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStartRequest(_message.Message):
    __slots__ = ("keys", "model_fingerprint")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    model_fingerprint: bytes
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., model_fingerprint: _Optional[bytes] = ...) -> None: ...

class GetStartResponse(_message.Message):
    __slots__ = ("lease_id", "locations", "lease_s")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    locations: _containers.RepeatedCompositeFieldContainer[Location]
    lease_s: float
    def __init__(self, lease_id: _Optional[str] = ..., locations: _Optional[_Iterable[_Union[Location, _Mapping]]] = ..., lease_s: _Optional[float] = ...) -> None: ...

class GetDoneRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class GetDoneResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class MasterStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStats(_message.Message):
    __slots__ = ("node", "num_slots", "num_slots_used", "num_values", "tiers")
    NODE_FIELD_NUMBER: _ClassVar[int]
    NUM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    NUM_SLOTS_USED_FIELD_NUMBER: _ClassVar[int]
    NUM_VALUES_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    num_slots: int
    num_slots_used: int
    num_values: int
    tiers: NodeTiers
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ..., num_slots: _Optional[int] = ..., num_slots_used: _Optional[int] = ..., num_values: _Optional[int] = ..., tiers: _Optional[_Union[NodeTiers, _Mapping]] = ...) -> None: ...

class MasterStats(_message.Message):
    __slots__ = ("num_keys", "num_leases", "num_pending_puts", "num_evictions", "num_dead_nodes", "num_expired_leases", "num_expired_puts", "num_rejected_inventory", "nodes")
    NUM_KEYS_FIELD_NUMBER: _ClassVar[int]
    NUM_LEASES_FIELD_NUMBER: _ClassVar[int]
    NUM_PENDING_PUTS_FIELD_NUMBER: _ClassVar[int]
    NUM_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_DEAD_NODES_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPIRED_LEASES_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPIRED_PUTS_FIELD_NUMBER: _ClassVar[int]
    NUM_REJECTED_INVENTORY_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    num_keys: int
    num_leases: int
    num_pending_puts: int
    num_evictions: int
    num_dead_nodes: int
    num_expired_leases: int
    num_expired_puts: int
    num_rejected_inventory: int
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStats]
    def __init__(self, num_keys: _Optional[int] = ..., num_leases: _Optional[int] = ..., num_pending_puts: _Optional[int] = ..., num_evictions: _Optional[int] = ..., num_dead_nodes: _Optional[int] = ..., num_expired_leases: _Optional[int] = ..., num_expired_puts: _Optional[int] = ..., num_rejected_inventory: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[NodeStats, _Mapping]]] = ...) -> None: ...

class PrepareWriteRequest(_message.Message):
    __slots__ = ("values", "timeout_s")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[StoredValue]
    timeout_s: float
    def __init__(self, values: _Optional[_Iterable[_Union[StoredValue, _Mapping]]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class PrepareWriteResponse(_message.Message):
    __slots__ = ("token", "offsets")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    token: bytes
    offsets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token: _Optional[bytes] = ..., offsets: _Optional[_Iterable[int]] = ...) -> None: ...

class PrepareReadRequest(_message.Message):
    __slots__ = ("values", "timeout_s")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[StoredValue]
    timeout_s: float
    def __init__(self, values: _Optional[_Iterable[_Union[StoredValue, _Mapping]]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class PrepareReadResponse(_message.Message):
    __slots__ = ("token", "values", "offsets")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    token: bytes
    values: _containers.RepeatedCompositeFieldContainer[StoredValue]
    offsets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token: _Optional[bytes] = ..., values: _Optional[_Iterable[_Union[StoredValue, _Mapping]]] = ..., offsets: _Optional[_Iterable[int]] = ...) -> None: ...

class FinishReadRequest(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: bytes
    def __init__(self, token: _Optional[bytes] = ...) -> None: ...

class FinishReadResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
