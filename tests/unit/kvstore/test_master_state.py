"""kvstore/master_state.py with a fake clock: placement, capacity, watermark LRU eviction, leases,
dead nodes, rebuild from inventories, fingerprints, refused puts."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.engine.block_hash import BlockHash
from pdserve.errors import InvalidRequest, NotFound
from pdserve.kvstore.config import MasterConfig
from pdserve.kvstore.master_state import MasterState
from pdserve.kvstore.values import NodeInfo, StoredValue, ValueMeta

FP = b"model-A".ljust(16, b"\0")
OTHER_FP = b"model-B".ljust(16, b"\0")
META = ValueMeta(nbytes=4 * 2 * 4 * 2 * 8 * 4, dtype="float32", shape=(4, 2, 4, 2, 8), fingerprint=FP)  # 2 KiB
SLOT = META.nbytes


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(i: int) -> BlockHash:
    return BlockHash(hashlib.sha256(str(i).encode()).digest()[:16])


def node(name: str, num_slots: int = 10, slot: int = SLOT) -> NodeInfo:
    return NodeInfo(name, f"{name}:1", f"{name}:2", num_slots * SLOT, slot)


def make(num_nodes: int = 1, num_slots: int = 10, **config) -> tuple[MasterState, Clock]:
    clock = Clock()
    state = MasterState(MasterConfig(**config), clock)
    for i in range(num_nodes):
        state.register_node(node(f"n{i}", num_slots), [])
    return state, clock


def put(state: MasterState, keys, meta: ValueMeta = META, failed=()) -> list:
    plan = state.put_start(keys, meta)
    if plan.put_id:
        state.put_commit(plan.put_id, failed)
    return plan


def used(state: MasterState) -> dict[str, tuple[int, int]]:
    return {info.node_id: (u, total) for info, u, total, _ in state.node_infos()}


def test_replicas_on_distinct_nodes():
    state, _ = make(num_nodes=3, replication=2)
    plan = put(state, [key(i) for i in range(6)])
    assert len(plan.placements) == 6
    for copies in plan.placements:
        assert len({c.node.node_id for c in copies}) == 2
    assert all(len(state.holders(key(i))) == 2 for i in range(6))
    assert sum(u for u, _ in used(state).values()) == 12


def test_replication_capped_by_number_of_nodes():
    state, _ = make(num_nodes=1, replication=3)
    plan = put(state, [key(0)])
    assert [len(c) for c in plan.placements] == [1]


def test_already_stored_keys_are_skipped():
    state, _ = make()
    put(state, [key(0), key(1)])
    plan = put(state, [key(0), key(1), key(2)])
    assert plan.already_stored == [key(0), key(1)]
    assert [c[0].key for c in plan.placements] == [key(2)]


def test_uncommitted_put_is_invisible_and_abort_frees_slots():
    state, _ = make()
    plan = state.put_start([key(0)], META)
    assert state.lookup([key(0)], FP) == 0
    assert state.put_start([key(0)], META).already_stored == [key(0)]  # pending elsewhere: not put twice
    state.put_abort(plan.put_id)
    assert used(state)["n0"][0] == 0
    with pytest.raises(NotFound):
        state.put_commit(plan.put_id)


def test_put_expires_when_never_committed():
    state, clock = make(put_timeout_s=5.0, node_timeout_s=60.0)
    plan = state.put_start([key(0)], META)
    clock.now += 6
    state.expire()
    assert used(state)["n0"][0] == 0 and state.counters.num_expired_puts == 1
    with pytest.raises(NotFound):
        state.put_commit(plan.put_id)


def test_failed_node_copies_not_committed():
    state, _ = make(num_nodes=2, replication=2)
    put(state, [key(0)], failed=["n1"])
    assert state.holders(key(0)) == ["n0"]
    assert used(state)["n1"][0] == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(1, 6), st.booleans()), min_size=1, max_size=60),
       st.integers(1, 3))
def test_capacity_never_exceeded_and_leased_never_evicted(ops, replication):
    state, clock = make(num_nodes=3, num_slots=8, replication=replication)
    leases = []
    for start, count, read in ops:
        keys = [key(start + i) for i in range(count)]
        if read:
            plan = state.get_start(keys, FP)
            if plan.lease_id:
                leases.append((plan.lease_id, [loc.key for loc in plan.locations]))
        else:
            put(state, keys)
        for u, total in used(state).values():
            assert u <= total
        for _, leased_keys in leases[-3:]:
            assert all(state.holders(k) for k in leased_keys), "a leased block was evicted"
        if len(leases) > 3:
            state.get_done(leases.pop(0)[0])
        clock.now += 0.01


def test_lru_eviction_between_watermarks_keeps_leased_block():
    state, _ = make(num_slots=10, high_watermark=0.9, low_watermark=0.5)
    put(state, [key(i) for i in range(9)])  # 9 of 10: at the high watermark
    assert state.counters.num_evictions == 0
    lease = state.get_start([key(0)], FP)  # key 0 is the oldest, but leased (and now most recent)
    state.get_start([key(1)], FP)  # touched too; released at once below
    state.get_done(state.get_start([key(1)], FP).lease_id)
    put(state, [key(100)])  # over the high watermark: evict down to the low one
    assert used(state)["n0"] == (5, 10)  # evicted down to 4 in use (< 0.5 * 10), then the new one
    assert state.holders(key(0)) == ["n0"]  # leased
    assert state.holders(key(100)) == ["n0"]
    # a put commits a prompt's blocks tail first, so LRU order was 8..2, 0 (leased), 1: the five oldest go
    assert [i for i in range(9) if not state.holders(key(i))] == [4, 5, 6, 7, 8]
    assert state.counters.num_evictions == 5
    state.get_done(lease.lease_id)


def test_full_of_leased_blocks_refuses_cleanly():
    state, _ = make(num_slots=4)
    put(state, [key(i) for i in range(3)])
    lease = state.get_start([key(i) for i in range(3)], FP)
    plan = put(state, [key(10), key(11), key(12)])
    assert plan.refused and not plan.placements[1:]  # at most one more slot
    for u, total in used(state).values():
        assert u <= total
    assert all(state.holders(key(i)) for i in range(3))
    state.get_done(lease.lease_id)


def test_lease_expiry_makes_block_evictable():
    state, clock = make(num_slots=2, high_watermark=1.0, low_watermark=0.5, lease_s=2.0)
    put(state, [key(0), key(1)])
    state.get_start([key(0), key(1)], FP)
    assert put(state, [key(2)]).refused == [key(2)]  # both leased
    clock.now += 3
    plan = put(state, [key(2)])
    assert not plan.refused and state.counters.num_expired_leases == 1
    assert state.num_leases == 0


def test_get_done_releases_and_unknown_lease_is_harmless():
    state, _ = make()
    put(state, [key(0)])
    plan = state.get_start([key(0)], FP)
    assert state.get_done(plan.lease_id) is True
    assert state.get_done(plan.lease_id) is False
    assert state.get_done("nope") is False


def test_lookup_and_get_return_longest_prefix():
    state, _ = make()
    put(state, [key(0), key(1), key(3)])
    keys = [key(0), key(1), key(2), key(3)]
    assert state.lookup(keys, FP) == 2
    plan = state.get_start(keys, FP)
    assert [loc.key for loc in plan.locations] == [key(0), key(1)]
    assert all(loc.meta == META and loc.offset % SLOT == 0 for loc in plan.locations)
    assert state.get_start([key(2)], FP).lease_id == ""


def test_other_model_never_served():
    state, _ = make()
    put(state, [key(0)])
    assert state.lookup([key(0)], OTHER_FP) == 0
    assert state.get_start([key(0)], OTHER_FP).locations == []
    assert put(state, [key(0)], ValueMeta(META.nbytes, META.dtype, META.shape, OTHER_FP)).already_stored == [key(0)]


def test_dead_node_dropped_and_not_placed_on():
    state, clock = make(num_nodes=2, replication=1, node_timeout_s=3.0)
    plan = put(state, [key(i) for i in range(4)])
    on_n1 = [c[0].key for c in plan.placements if c[0].node.node_id == "n1"]
    assert on_n1
    clock.now += 2
    state.heartbeat("n0")
    clock.now += 2  # n1 silent for 4 s
    assert state.lookup(on_n1[:1], FP) == 0
    assert state.counters.num_dead_nodes == 1
    assert not state.heartbeat("n1")  # it must re-register
    plan = put(state, [key(i) for i in range(10, 14)])
    assert {c[0].node.node_id for c in plan.placements} == {"n0"}


def test_rebuild_from_inventories_after_restart():
    state, _ = make(num_nodes=2, replication=2)
    plan = put(state, [key(i) for i in range(5)])
    inventories: dict[str, list[StoredValue]] = {"n0": [], "n1": []}
    for copies in plan.placements:
        for c in copies:
            inventories[c.node.node_id].append(StoredValue(c.key, c.offset, c.meta))
    restarted = MasterState(MasterConfig(replication=2), Clock())
    for name, inventory in inventories.items():
        assert restarted.register_node(node(name), inventory) == []
    assert restarted.lookup([key(i) for i in range(5)], FP) == 5
    assert all(len(restarted.holders(key(i))) == 2 for i in range(5))
    assert used(restarted) == used(state)
    # new puts never land on a slot the inventories hold
    new = put(restarted, [key(i) for i in range(10, 14)])
    held = {(c.node.node_id, c.offset) for copies in plan.placements for c in copies}
    assert not held & {(c.node.node_id, c.offset) for copies in new.placements for c in copies}


def test_inventory_lies_are_refused():
    state = MasterState(MasterConfig(), Clock())
    bad_size = ValueMeta(META.nbytes // 2, META.dtype, META.shape, FP)  # size does not match shape
    too_big = ValueMeta(SLOT * 2, "float32", (SLOT // 2,), FP)  # larger than a slot
    inventory = [StoredValue(key(0), 0, META), StoredValue(key(1), SLOT, bad_size), StoredValue(key(2), 2 * SLOT, too_big),
                 StoredValue(key(3), 0, META),  # slot 0 twice
                 StoredValue(key(4), 100 * SLOT, META), StoredValue(key(5), SLOT + 1, META)]
    rejected = state.register_node(node("n0"), inventory)
    assert rejected == [key(i) for i in range(1, 6)]
    assert state.lookup([key(0)], FP) == 1


def test_oversized_put_refused():
    state, _ = make(num_slots=4)
    huge = ValueMeta(SLOT * 2, "float32", (SLOT // 2,), FP)
    with pytest.raises(InvalidRequest):
        state.put_start([key(0)], huge)
    with pytest.raises(InvalidRequest):
        state.put_start([key(0)], ValueMeta(123, "float32", (4,), FP))  # nbytes inconsistent with shape
    plan = put(state, [key(i) for i in range(10)])  # more than the node's free space
    assert len(plan.placements) + len(plan.refused) == 10 and plan.refused
    assert used(state)["n0"][0] <= 4
    assert state.num_pending_puts == 0


def test_slot_size_fixed_by_first_value():
    state = MasterState(MasterConfig(), Clock())
    state.register_node(NodeInfo("n0", "a:1", "a:2", 10 * SLOT, 0), [])
    put(state, [key(0)])
    assert used(state)["n0"] == (1, 10)
    with pytest.raises(InvalidRequest):
        state.put_start([key(1)], ValueMeta(SLOT * 2, "float32", (SLOT // 2,), FP))


def test_reregistering_node_replaces_old_record():
    state, _ = make()
    put(state, [key(0)])
    state.register_node(node("n0"), [])  # restarted node, empty pool
    assert state.lookup([key(0)], FP) == 0
    assert used(state)["n0"][0] == 0


def test_get_prefers_a_dram_copy_the_nodes_reported():
    """With replicas on two nodes, a get takes the copy its node last reported in DRAM (an SSD copy must be read
    back before it is served); a promotion reported later makes that copy eligible again."""
    state, _ = make(num_nodes=2, replication=2)
    keys = [key(i) for i in range(3)]
    put(state, keys)
    first = {loc.key: loc.node.node_id for loc in state.get_start(keys, FP).locations}
    assert set(first.values()) == {"n0"}  # equal otherwise: the lower id
    for lease in list(state._leases):
        state.get_done(lease)
    assert state.heartbeat("n0", ssd_keys=[keys[0], keys[2]])
    got = {loc.key: loc.node.node_id for loc in state.get_start(keys, FP).locations}
    assert got == {keys[0]: "n1", keys[1]: "n0", keys[2]: "n1"}
    for lease in list(state._leases):
        state.get_done(lease)
    assert state.heartbeat("n0", dram_keys=[keys[0]])
    got = {loc.key: loc.node.node_id for loc in state.get_start(keys, FP).locations}
    assert got[keys[0]] == "n0" and got[keys[2]] == "n1"

