"""MasterConfig and NodeConfig: every setting of the KV cache store's master and nodes."""

from __future__ import annotations

from dataclasses import dataclass, field


def _h(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass(slots=True)
class MasterConfig:
    host: str = field(default="127.0.0.1", metadata=_h("address the master's gRPC server binds to"))
    port: int = field(default=50070, metadata=_h("gRPC port (0: pick a free one)"))
    replication: int = field(default=1, metadata=_h("copies of each block, on distinct nodes (fewer when fewer "
                                                    "nodes have room)"))
    high_watermark: float = field(default=0.95, metadata=_h(
        "fraction of a node's slots in use above which a put evicts least-recently-used blocks ..."))
    low_watermark: float = field(default=0.9, metadata=_h("... down to this fraction"))
    lease_s: float = field(default=10.0, metadata=_h("a get's lease: its blocks are not evicted for this long "
                                                     "unless released earlier"))
    put_timeout_s: float = field(default=30.0, metadata=_h("slots of a put neither committed nor aborted by then "
                                                           "are freed"))
    node_timeout_s: float = field(default=3.0, metadata=_h("a node silent this long is dead: its blocks leave the "
                                                           "map and nothing more is placed on it"))
    heartbeat_interval_s: float = field(default=0.5, metadata=_h("how often nodes are told to heartbeat"))
    metrics_port: int = field(default=-1, metadata=_h("serve Prometheus /metrics on this port (-1: off, 0: any free)"))
    advertise_host: str = field(default="", metadata=_h("host clients use to reach this master (default: --host)"))
    election_ttl_s: float = field(default=3.0, metadata=_h(
        "with --etcd: TTL of the leader's lease; a standby takes over at most this long after the leader dies"))

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError("port must be in [0, 65535]")
        if self.election_ttl_s < 2:
            raise ValueError("election_ttl_s must be >= 2")
        if self.replication < 1:
            raise ValueError("replication must be >= 1")
        if not 0.0 < self.low_watermark <= self.high_watermark <= 1.0:
            raise ValueError("need 0 < low_watermark <= high_watermark <= 1")
        if min(self.lease_s, self.put_timeout_s, self.node_timeout_s, self.heartbeat_interval_s) <= 0:
            raise ValueError("timeouts and intervals must be > 0")
        if not -1 <= self.metrics_port < 65536:
            raise ValueError("metrics_port must be -1 (off) or in [0, 65535]")
        if self.heartbeat_interval_s >= self.node_timeout_s:
            raise ValueError("heartbeat_interval_s must be shorter than node_timeout_s")


@dataclass(slots=True)
class NodeConfig:
    master: str = field(default="127.0.0.1:50070", metadata=_h("master address host:port, or a comma-separated list of masters (the leading one answers)"))
    host: str = field(default="127.0.0.1", metadata=_h("address the gRPC and UCX listeners bind to"))
    port: int = field(default=0, metadata=_h("gRPC port (0: pick a free one)"))
    transfer_port: int = field(default=0, metadata=_h("UCX transfer listener port (0: pick a free one)"))
    advertise_host: str = field(default="", metadata=_h(
        "host the master and clients use to reach this node (default: --host)"))
    node_id: str = field(default="", metadata=_h("stable name of this node (default: node@host:port)"))
    # 1 GiB: twice a worker's default KV cache (engine kv_cache_memory_mb), so a store node holds what
    # a prefill worker's own cache has dropped; a smaller store only repeats the worker's cache.
    capacity_mb: int = field(default=1024, metadata=_h("memory (DRAM) tier size in MiB"))
    ssd_dir: str = field(default="", metadata=_h(
        "directory of the SSD tier's file (empty: no SSD tier); values evicted from DRAM go there, and a "
        "hit there is read back and promoted. The file is discarded when the node restarts", metavar="DIR"))
    ssd_mb: int = field(default=4096, metadata=_h("SSD tier size in MiB, reserved at start-up (with --ssd-dir)"))
    ssd_batch_blocks: int = field(default=32, metadata=_h(
        "values moved from DRAM to SSD per write, at least (larger, fewer writes)"))
    slot_kb: int = field(default=0, metadata=_h(
        "slot size in KiB, one block value per slot (0: fixed by the first value written)"))
    memory: str = field(default="host", metadata=_h("pool memory: host (numpy) or device (cupy, needs a GPU)",
                                                    choices=["host", "device"]))
    transfer_timeout_s: float = field(default=30.0, metadata=_h("bound on every KV transfer"))
    transfer_lanes: int = field(default=2, metadata=_h("parallel UCX endpoints per peer"))
    metrics_port: int = field(default=-1, metadata=_h("serve Prometheus /metrics on this port (-1: off, 0: any free)"))
    fault_lie_about_sizes: bool = field(default=False, metadata=_h(
        "testing only: claim half the real size of every value read (clients must catch it)"))

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536 or not 0 <= self.transfer_port < 65536:
            raise ValueError("ports must be in [0, 65535]")
        if self.capacity_mb < 1:
            raise ValueError("capacity_mb must be >= 1")
        if self.ssd_mb < 0 or self.ssd_batch_blocks < 1:
            raise ValueError("ssd_mb must be >= 0 and ssd_batch_blocks >= 1")
        if self.slot_kb < 0 or self.slot_kb * 1024 > self.capacity_mb * 2**20:
            raise ValueError("slot_kb must be >= 0 and fit in the pool")
        if self.memory not in ("host", "device"):
            raise ValueError("memory must be host or device")
        if self.transfer_timeout_s <= 0 or self.transfer_lanes < 1:
            raise ValueError("transfer_timeout_s must be > 0 and transfer_lanes >= 1")
        if not self.master:
            raise ValueError("master address is required")
        if not -1 <= self.metrics_port < 65536:
            raise ValueError("metrics_port must be -1 (off) or in [0, 65535]")
