"""Prometheus collectors of the KV cache store: the master's map (keys, leases, evictions, the
block hit ratio of loads, per-node capacity) and a node's pool and transfers. Both read the live
state at scrape time; `pdserve.metrics_server.MetricsServer` serves them on `--metrics-port`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from .master_state import MasterState
    from .node import StoreNode

# MasterCounters attribute -> (metric name without _total, help). Names share the pdserve:store_ prefix.
_MASTER_COUNTERS = {
    "num_get_query_blocks": ("pdserve:store_get_query_blocks", "Blocks asked for by loads (GetStart)."),
    "num_get_hit_blocks": ("pdserve:store_get_hit_blocks", "Blocks served by loads: the longest stored prefix."),
    "num_committed_copies": ("pdserve:store_committed_copies", "Block copies made visible by PutCommit."),
    "num_evictions": ("pdserve:store_evictions", "Blocks evicted (LRU between the watermarks)."),
    "num_dead_nodes": ("pdserve:store_dead_nodes", "Nodes declared dead (silent past --node-timeout-s)."),
    "num_expired_leases": ("pdserve:store_expired_leases", "Read leases freed by their deadline."),
    "num_expired_puts": ("pdserve:store_expired_puts", "Puts neither committed nor aborted in time."),
    "num_rejected_inventory": ("pdserve:store_rejected_inventory",
                               "Values a (re)registering node reported that the master refused."),
}
NODE_LABELS = ["node"]


class MasterCollector:
    """The master's map, read at scrape time."""

    def __init__(self, state: MasterState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        s = self.state
        s.expire()
        c = s.counters
        yield GaugeMetricFamily("pdserve:store_keys", "Blocks stored (distinct keys).", value=s.num_keys)
        yield GaugeMetricFamily("pdserve:store_leases", "Read leases held now.", value=s.num_leases)
        yield GaugeMetricFamily("pdserve:store_pending_puts", "Puts started and not yet committed.",
                                value=s.num_pending_puts)
        for attr, (name, help_text) in _MASTER_COUNTERS.items():
            yield CounterMetricFamily(name, help_text, value=getattr(c, attr))
        ratio = c.num_get_hit_blocks / c.num_get_query_blocks if c.num_get_query_blocks else 0.0
        yield GaugeMetricFamily("pdserve:store_hit_ratio",
                                "Fraction of blocks asked for by loads that the store served, since start.",
                                value=ratio)
        slots = GaugeMetricFamily("pdserve:store_node_slots", "Slots in a live node's pool.", labels=NODE_LABELS)
        used = GaugeMetricFamily("pdserve:store_node_slots_used", "Slots committed or pending on a live node.",
                                 labels=NODE_LABELS)
        values = GaugeMetricFamily("pdserve:store_node_values", "Committed values on a live node.",
                                   labels=NODE_LABELS)
        nodes = s.node_infos()
        for info, num_used, num_slots, num_values in nodes:
            slots.add_metric([info.node_id], num_slots)
            used.add_metric([info.node_id], num_used)
            values.add_metric([info.node_id], num_values)
        yield from (slots, used, values)
        yield GaugeMetricFamily("pdserve:store_live_nodes", "Nodes alive now.", value=len(nodes))
        ssd = GaugeMetricFamily("pdserve:store_node_ssd_values", "Values a live node reported on its SSD tier "
                                "(last heartbeat).", labels=NODE_LABELS)
        for info, *_ in nodes:
            tiers = s.node_tiers(info.node_id)
            if tiers is not None:
                ssd.add_metric([info.node_id], tiers.ssd.num_values)
        yield ssd


# TierStats field -> (metric, help, counter?). Each with labels node and tier ("dram" | "ssd").
_TIER_FIELDS = {
    "num_slots": ("pdserve:store_tier_slots", "Slots of the tier (0: none, or turned off).", False),
    "num_values": ("pdserve:store_tier_values", "Values the tier holds.", False),
    "num_pinned": ("pdserve:store_tier_pinned", "dram: frames held now by reads, writes in flight or moves.", False),
    "num_hits": ("pdserve:store_tier_hits", "Values served to readers from the tier.", True),
    "num_evictions": ("pdserve:store_tier_evictions",
                      "dram: values moved to SSD (or dropped without it); ssd: values whose slot was reused.", True),
    "bytes_read": ("pdserve:store_tier_read_bytes", "Bytes read from the tier's file (ssd).", True),
    "bytes_written": ("pdserve:store_tier_written_bytes", "Bytes written to the tier's file (ssd).", True),
    "read_seconds": ("pdserve:store_tier_read_seconds", "Seconds spent reading the tier's file (ssd).", True),
    "write_seconds": ("pdserve:store_tier_write_seconds", "Seconds spent writing the tier's file (ssd).", True),
}


def tier_metrics(tiers, node_labels: list[str]) -> Iterator[Metric]:
    """One family per TierStats field, a sample per tier; plus promotions and corrupt reads."""
    for attr, (name, help_text, is_counter) in _TIER_FIELDS.items():
        family = (CounterMetricFamily if is_counter else GaugeMetricFamily)(name, help_text,
                                                                            labels=[*NODE_LABELS, "tier"])
        for tier in ("dram", "ssd"):
            family.add_metric([*node_labels, tier], getattr(getattr(tiers, tier), attr))
        yield family
    for name, help_text, value in (
            ("pdserve:store_tier_promotions", "SSD values copied up to DRAM to be read.", tiers.num_promotions),
            ("pdserve:store_tier_corrupt_reads", "SSD reads that failed their checksum (dropped, never served).",
             tiers.num_corrupt_reads)):
        family = CounterMetricFamily(name, help_text, labels=NODE_LABELS)
        family.add_metric(node_labels, value)
        yield family


class NodeCollector:
    """One node's pool and its KV transport's counters, read at scrape time."""

    def __init__(self, node: StoreNode) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        labels = [node.node_id]
        pool = node.pool

        def gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, help_text, labels=NODE_LABELS)
            family.add_metric(labels, value)
            return family

        def counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, help_text, labels=NODE_LABELS)
            family.add_metric(labels, value)
            return family

        yield gauge("pdserve:store_pool_capacity_bytes", "Bytes in the node's memory (DRAM) tier.", pool.capacity_bytes)
        yield gauge("pdserve:store_pool_slots", "Slots in the pool, both tiers (0 until the first write fixes the size).",
                    pool.num_slots)
        yield gauge("pdserve:store_pool_values", "Values held in the pool, both tiers.", pool.num_values)
        yield from tier_metrics(node.tiers.stats(), labels)
        stats = getattr(node.transport, "stats", None)
        if stats is None:
            return
        yield counter("pdserve:kv_transfer_bytes_sent", "KV bytes that left this node (loads served).",
                      stats.bytes_sent)
        yield counter("pdserve:kv_transfer_bytes_received", "KV bytes that landed in this node (puts).",
                      stats.bytes_received)
        yield counter("pdserve:kv_transfer_rejected",
                      "Transfers refused before any byte moved (bad token, region, late or replayed).",
                      stats.num_rejected)
        yield counter("pdserve:kv_transfer_failures", "Transfers that broke after starting, timeouts included.",
                      stats.num_failures)
