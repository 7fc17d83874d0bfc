"""The KV store master's state: which nodes hold which block values, slot allocation per node, LRU
eviction between watermarks, leases, pending puts and node liveness. Pure logic with an injected
clock; no I/O (`master.py` serves it over gRPC). Never touches bytes: nodes hold them.

A node's pool is `num_slots` fixed-size slots (`slot_nbytes` each, one block value per slot); the
master hands out slot indices, so it alone accounts for capacity. A slot is free, pending (a put
in flight), or holds a committed replica. The slots span both of a node's tiers (DRAM, then SSD:
`NodeInfo.num_slots`), so placement and LRU eviction count the whole node; which tier holds a value
is the node's choice (recently used values stay in DRAM, node_pool.py), and the master keeps each
node's tier use from its heartbeats (`tiers`, shown in Stats and metrics).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from pdserve.engine.block_hash import BlockHash
from pdserve.errors import InvalidRequest, NotFound

from .config import MasterConfig
from .values import Location, NodeInfo, StoredValue, ValueMeta

logger = logging.getLogger(__name__)

@dataclass(slots=True)
class _Node:
    info: NodeInfo
    last_seen: float
    slot_nbytes: int
    free_slots: list[int] = field(default_factory=list)  # stack, lowest index on top
    pending_slots: set[int] = field(default_factory=set)
    lru: OrderedDict[BlockHash, int] = field(default_factory=OrderedDict)  # committed key -> slot, oldest first
    tiers: object = None  # the node's last reported kpb.NodeTiers (opaque here)
    ssd_keys: set[BlockHash] = field(default_factory=set)  # committed copies the node reported on its SSD tier

    @property
    def num_slots(self) -> int:
        return self.info.num_slots(self.slot_nbytes)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self.free_slots)

    def fix_slot_size(self, nbytes: int) -> None:
        self.slot_nbytes = nbytes
        self.free_slots = list(reversed(range(self.num_slots)))

    def can_hold(self, nbytes: int) -> bool:
        return nbytes <= self.slot_nbytes if self.slot_nbytes else nbytes <= self.info.capacity_bytes

    def location(self, key: BlockHash, slot: int, meta: ValueMeta) -> Location:
        return Location(key, replace(self.info, slot_nbytes=self.slot_nbytes), slot * self.slot_nbytes, meta)


@dataclass(slots=True)
class _Entry:
    meta: ValueMeta
    replicas: dict[str, int] = field(default_factory=dict)  # node_id -> lease count of that copy


@dataclass(slots=True)
class _PendingPut:
    deadline: float
    meta: ValueMeta
    slots: list[tuple[BlockHash, str, int]]  # (key, node_id, slot)


@dataclass(slots=True)
class _Lease:
    deadline: float
    replicas: list[tuple[BlockHash, str]]  # (key, node_id)


@dataclass(frozen=True, slots=True)
class PutPlan:
    put_id: str
    placements: list[list[Location]]  # per key to write, its copies (distinct nodes); keys in request order
    already_stored: list[BlockHash]  # skipped: committed or being put by someone else
    refused: list[BlockHash]  # no room: this key and every later one (a prefix without them is useless)
    expires_in_s: float


@dataclass(frozen=True, slots=True)
class GetPlan:
    lease_id: str  # "" when nothing is leased
    locations: list[Location]  # one copy per key of the longest stored prefix
    lease_s: float


@dataclass(slots=True)
class MasterCounters:
    num_evictions: int = 0
    num_dead_nodes: int = 0
    num_expired_leases: int = 0
    num_expired_puts: int = 0
    num_rejected_inventory: int = 0
    num_get_query_blocks: int = 0  # keys asked for by get_start (loads)
    num_get_hit_blocks: int = 0  # of those, served: the longest stored prefix
    num_committed_copies: int = 0  # block copies made visible by put_commit


class MasterState:
    def __init__(self, config: MasterConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._nodes: dict[str, _Node] = {}  # node_id -> node
        self._entries: dict[BlockHash, _Entry] = {}  # key -> committed copies
        self._pending_keys: dict[BlockHash, str] = {}  # key being put -> put_id
        self._puts: dict[str, _PendingPut] = {}  # put_id -> slots it holds
        self._leases: dict[str, _Lease] = {}  # lease_id -> copies it protects
        self.counters = MasterCounters()

    # ---- nodes ------------------------------------------------------------------------------------
    def register_node(self, info: NodeInfo, inventory: Sequence[StoredValue]) -> list[BlockHash]:
        """(Re)adds a node with everything it holds; returns the inventory keys refused (the node frees them)."""
        self.expire()
        for node_id in [n for n, node in self._nodes.items() if n == info.node_id or node.info.address == info.address]:
            self._drop_node(node_id, "re-registered")
        if info.capacity_bytes <= 0 or info.slot_nbytes < 0 or info.slot_nbytes > info.capacity_bytes:
            raise InvalidRequest(f"node {info.node_id}: bad capacity {info.capacity_bytes} / slot {info.slot_nbytes}")
        node = _Node(info, self._clock(), 0)
        if info.slot_nbytes:
            node.fix_slot_size(info.slot_nbytes)
        self._nodes[info.node_id] = node
        taken: set[int] = set()
        rejected: list[BlockHash] = []
        for value in inventory:
            reason = self._inventory_problem(node, value, taken)
            if reason:
                logger.warning("node %s: refusing inventory key %s: %s", info.node_id, value.key.hex(), reason)
                rejected.append(value.key)
                continue
            slot = value.offset // node.slot_nbytes
            taken.add(slot)
            self._entries.setdefault(value.key, _Entry(value.meta)).replicas[info.node_id] = 0
            node.lru[value.key] = slot
        if taken:
            node.free_slots = [s for s in node.free_slots if s not in taken]
        self.counters.num_rejected_inventory += len(rejected)
        logger.info("node %s registered (%s, %d of %d slots of %d B in use, %d refused)", info.node_id, info.address,
                    node.num_used, node.num_slots, node.slot_nbytes, len(rejected))
        return rejected

    def _inventory_problem(self, node: _Node, value: StoredValue, taken: set[int]) -> str:
        try:
            value.meta.check()
        except InvalidRequest as exc:
            return str(exc)
        if not node.slot_nbytes:
            return "node has no slot size"
        if value.meta.nbytes > node.slot_nbytes or value.offset % node.slot_nbytes:
            return f"{value.meta.nbytes} B at offset {value.offset} does not fit slots of {node.slot_nbytes} B"
        slot = value.offset // node.slot_nbytes
        if not 0 <= slot < node.num_slots or slot in taken or value.key in node.lru:
            return f"slot {slot} out of range or listed twice"
        entry = self._entries.get(value.key)
        if entry is not None and entry.meta != value.meta:
            return "metadata differs from another copy"
        return ""

    def heartbeat(self, node_id: str, tiers: object = None, ssd_keys: Sequence[BlockHash] = (),
                  dram_keys: Sequence[BlockHash] = ()) -> bool:
        """False for an unknown (e.g. declared dead, or after a master restart) node: it must re-register.
        `ssd_keys` / `dram_keys`: its values that moved to SSD / back to DRAM since its last heartbeat."""
        node = self._nodes.get(node_id)
        if node is None:
            return False
        node.last_seen = self._clock()
        if tiers is not None:
            node.tiers = tiers
        node.ssd_keys.update(k for k in ssd_keys if k in node.lru)
        node.ssd_keys.difference_update(dram_keys)
        return True

    def _drop_node(self, node_id: str, why: str) -> None:
        node = self._nodes.pop(node_id)
        for key in node.lru:
            entry = self._entries[key]
            entry.replicas.pop(node_id, None)
            if not entry.replicas:
                del self._entries[key]
        logger.warning("node %s dropped (%s): %d values gone from the map", node_id, why, len(node.lru))

    def expire(self) -> None:
        """Drops dead nodes, expired leases and puts; called before every operation and periodically."""
        now = self._clock()
        for node_id in [n for n, node in self._nodes.items() if now - node.last_seen > self.config.node_timeout_s]:
            self.counters.num_dead_nodes += 1
            self._drop_node(node_id, f"silent for {self.config.node_timeout_s} s")
        for lease_id in [i for i, lease in self._leases.items() if lease.deadline < now]:
            self.counters.num_expired_leases += 1
            self.get_done(lease_id)
        for put_id in [i for i, put in self._puts.items() if put.deadline < now]:
            self.counters.num_expired_puts += 1
            self._finish_put(put_id, failed_node_ids=None)

    # ---- reads ------------------------------------------------------------------------------------
    def _stored(self, key: BlockHash, fingerprint: bytes) -> _Entry | None:
        entry = self._entries.get(key)
        return entry if entry is not None and entry.meta.fingerprint == fingerprint else None

    def lookup(self, keys: Sequence[BlockHash], fingerprint: bytes) -> int:
        """Number of leading keys stored for this model; no side effects."""
        self.expire()
        n = 0
        while n < len(keys) and self._stored(keys[n], fingerprint) is not None:
            n += 1
        return n

    def get_start(self, keys: Sequence[BlockHash], fingerprint: bytes) -> GetPlan:
        """One copy of each key of the longest stored prefix, leased (not evictable) until get_done or expiry."""
        self.expire()
        locations: list[Location] = []
        replicas: list[tuple[BlockHash, str]] = []
        for key in keys:
            entry = self._stored(key, fingerprint)
            if entry is None:
                break
            # the least-leased copy, then one in DRAM (an SSD copy is read back first), then the least full node
            node_id = min(entry.replicas, key=lambda n: (entry.replicas[n], key in self._nodes[n].ssd_keys,
                                                         self._nodes[n].num_used, n))
            entry.replicas[node_id] += 1
            replicas.append((key, node_id))
            node = self._nodes[node_id]
            locations.append(node.location(key, node.lru[key], entry.meta))
        for key, _ in reversed(replicas):  # a prompt's first blocks become the most recent: tails go first
            self._touch(key)
        self.counters.num_get_query_blocks += len(keys)
        self.counters.num_get_hit_blocks += len(replicas)
        if not replicas:
            return GetPlan("", [], 0.0)
        lease_id = secrets.token_hex(8)
        self._leases[lease_id] = _Lease(self._clock() + self.config.lease_s, replicas)
        return GetPlan(lease_id, locations, self.config.lease_s)

    def get_done(self, lease_id: str) -> bool:
        """Releases a lease; False when unknown (expired or released already)."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        for key, node_id in lease.replicas:
            entry = self._entries.get(key)
            if entry is not None and node_id in entry.replicas:
                entry.replicas[node_id] -= 1
        return True

    def _touch(self, key: BlockHash) -> None:
        for node_id in self._entries[key].replicas:
            self._nodes[node_id].lru.move_to_end(key)

    # ---- writes -----------------------------------------------------------------------------------
    def put_start(self, keys: Sequence[BlockHash], meta: ValueMeta) -> PutPlan:
        """Allocates slots for the keys not yet stored, `replication` copies each on distinct nodes."""
        self.expire()
        meta.check()
        live = list(self._nodes.values())
        if live and not any(node.can_hold(meta.nbytes) for node in live):
            raise InvalidRequest(f"a value of {meta.nbytes} B is larger than every node's slot or capacity")
        put_id = secrets.token_hex(8)
        placements: list[list[Location]] = []
        already: list[BlockHash] = []
        refused: list[BlockHash] = []
        pending = _PendingPut(self._clock() + self.config.put_timeout_s, meta, [])
        for i, key in enumerate(keys):
            if key in self._entries or key in self._pending_keys:
                already.append(key)
                continue
            copies = self._place(key, meta, pending)
            if not copies:
                refused = list(keys[i:])
                break
            placements.append(copies)
            self._pending_keys[key] = put_id
        if pending.slots:
            self._puts[put_id] = pending
        return PutPlan(put_id if pending.slots else "", placements, already, refused, self.config.put_timeout_s)

    def _place(self, key: BlockHash, meta: ValueMeta, pending: _PendingPut) -> list[Location]:
        candidates = sorted((n for n in self._nodes.values() if n.can_hold(meta.nbytes)),
                            key=lambda n: (n.num_used / n.num_slots if n.num_slots else 0.0, n.info.node_id))
        copies: list[Location] = []
        for node in candidates:
            if len(copies) == self.config.replication:
                break
            slot = self._take_slot(node, meta.nbytes)
            if slot is None:
                continue
            node.pending_slots.add(slot)
            pending.slots.append((key, node.info.node_id, slot))
            copies.append(node.location(key, slot, meta))
        return copies

    def _take_slot(self, node: _Node, nbytes: int) -> int | None:
        if not node.slot_nbytes:
            node.fix_slot_size(nbytes)
        if node.num_used + 1 > self.config.high_watermark * node.num_slots:
            self._evict(node, math.floor(self.config.low_watermark * node.num_slots) - 1)
        return node.free_slots.pop() if node.free_slots else None

    def _evict(self, node: _Node, target_used: int) -> None:
        """Drops least-recently-used, unleased copies on `node` until at most `target_used` slots are in use."""
        node_id = node.info.node_id
        for key in list(node.lru):
            if node.num_used <= target_used:
                break
            entry = self._entries[key]
            if entry.replicas[node_id] > 0:
                continue  # leased: someone is reading it
            del entry.replicas[node_id]
            if not entry.replicas:
                del self._entries[key]
            node.free_slots.append(node.lru.pop(key))
            node.ssd_keys.discard(key)
            self.counters.num_evictions += 1

    def put_commit(self, put_id: str, failed_node_ids: Sequence[str] = ()) -> int:
        """Makes the put's copies visible, except those on failed (or since dead) nodes; returns copies committed."""
        self.expire()
        if put_id not in self._puts:
            raise NotFound(f"unknown or expired put {put_id!r}")
        return self._finish_put(put_id, set(failed_node_ids))

    def put_abort(self, put_id: str) -> None:
        self.expire()
        if put_id in self._puts:
            self._finish_put(put_id, failed_node_ids=None)

    def _finish_put(self, put_id: str, failed_node_ids: set[str] | None) -> int:
        """Commits the copies not on failed nodes (None: all failed, i.e. abort); frees the others' slots."""
        put = self._puts.pop(put_id)
        num_committed = 0
        for key, node_id, slot in reversed(put.slots):  # later blocks of a prompt are evicted first
            if self._pending_keys.get(key) == put_id:
                del self._pending_keys[key]
            node = self._nodes.get(node_id)
            if node is None:
                continue  # died meanwhile: its slots went with it
            node.pending_slots.discard(slot)
            if failed_node_ids is None or node_id in failed_node_ids:
                node.free_slots.append(slot)
                continue
            entry = self._entries.setdefault(key, _Entry(put.meta))
            if entry.meta != put.meta or node_id in entry.replicas:
                node.free_slots.append(slot)  # another put stored it first (after a restart); keep that copy
                continue
            entry.replicas[node_id] = 0
            node.lru[key] = slot
            node.ssd_keys.discard(key)  # a write lands in DRAM
            num_committed += 1
        self.counters.num_committed_copies += num_committed
        return num_committed

    # ---- introspection ----------------------------------------------------------------------------
    def node_infos(self) -> list[tuple[NodeInfo, int, int, int]]:
        """(info with the current slot size, slots in use, total slots, committed values) per live node."""
        return [(replace(n.info, slot_nbytes=n.slot_nbytes), n.num_used, n.num_slots, len(n.lru))
                for n in self._nodes.values()]

    def node_tiers(self, node_id: str) -> object:
        """The node's last reported tier stats (None before its first heartbeat with them)."""
        node = self._nodes.get(node_id)
        return node.tiers if node is not None else None

    @property
    def num_keys(self) -> int:
        return len(self._entries)

    @property
    def num_leases(self) -> int:
        return len(self._leases)

    @property
    def num_pending_puts(self) -> int:
        return len(self._puts)

    def holders(self, key: BlockHash) -> list[str]:
        entry = self._entries.get(key)
        return sorted(entry.replicas) if entry else []
