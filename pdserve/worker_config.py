"""WorkerConfig: the settings every worker role shares (network, registration, timeouts).

Engine settings live in `pdserve.engine.config.EngineConfig`; a worker's flags are both.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _h(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass(slots=True)
class WorkerConfig:
    host: str = field(default="127.0.0.1", metadata=_h("address the gRPC and UCX listeners bind to"))
    port: int = field(default=0, metadata=_h("gRPC port (0: pick a free one)"))
    transfer_port: int = field(default=0, metadata=_h("UCX transfer listener port (0: pick a free one)"))
    advertise_host: str = field(default="", metadata=_h("host peers use to reach this worker (default: --host)"))
    router: str = field(default="", metadata=_h(
        "router address host:port to register with, or a comma-separated list of router replicas (each gets "
        "the registration); empty: none (with --etcd, routers find the worker there)"))
    worker_id: str = field(default="", metadata=_h("name in logs and stats (default: role@host:port)"))
    reservation_timeout_s: float = field(default=10.0, metadata=_h(
        "decode: a reservation's lease: freed unless its KV lands or its prefill renews it (every third of "
        "this, from when the prefill receives the request) within it"))
    reservation_max_s: float = field(default=600.0, metadata=_h(
        "decode: longest a reservation lives however often it is renewed (the router's hop timeout may cut it)"))
    reserve_headroom_tokens: int = field(default=256, metadata=_h(
        "decode: a reservation holds the prompt's blocks plus min(max_tokens, this) tokens; the sequence "
        "takes more blocks as it generates (preempting, then recomputing, when the pool is full)"))
    transfer_timeout_s: float = field(default=30.0, metadata=_h("bound on every KV transfer"))
    transfer_lanes: int = field(default=4, metadata=_h("parallel UCX endpoints per peer"))
    kvstore_master: str = field(default="", metadata=_h(
        "KV cache store master host:port, or a comma-separated list of masters (the leading one answers); "
        "empty: no store, prompt blocks are then only cached locally"))
    store_publish: bool = field(default=True, metadata=_h(
        "with a store: publish newly computed full prompt blocks (prefill, and decode's local prefills) so other "
        "workers reuse them"))
    store_publish_generated: bool = field(default=True, metadata=_h(
        "decode: with a store, publish each block of generated text as soon as it is full (in the background), "
        "so a failover elsewhere resumes from stored KV and a follow-up turn reuses its whole history"))
    store_publish_hold_ms: float = field(default=100.0, metadata=_h(
        "decode: with store_publish_generated, a stream's next token waits at most this long for the request's "
        "newly full blocks to be stored, so a failover at any moment recomputes at most the last block (the "
        "engine keeps stepping meanwhile; 0: never wait)"))
    store_publish_queue_blocks: int = field(default=64, metadata=_h(
        "decode: generated blocks staged for the store and not yet stored, at most; beyond it blocks are "
        "dropped (counted), never waited for"))
    kv_push: str = field(default="chunk", metadata=_h(
        "prefill: when KV goes to decode: per layer as each is computed, per chunk (all layers of a "
        "prefill chunk, while the next chunk computes), or once per request after the last chunk",
        choices=["layer", "chunk", "request"]))
    metrics_port: int = field(default=-1, metadata=_h(
        "port of the Prometheus /metrics HTTP listener (-1: off; 0: pick a free one, logged)"))
    tls_cert_file: str = field(default="", metadata=_h("PEM certificate of the gRPC listener (with --tls-key-file: TLS)",
                                                       metavar="FILE"))
    tls_key_file: str = field(default="", metadata=_h("PEM private key of the gRPC listener", metavar="FILE"))
    router_tls_ca_file: str = field(default="", metadata=_h(
        "PEM CA certificate to trust when registering with a TLS router (empty: plain gRPC)", metavar="FILE"))

    role_switching: str = field(default="auto", metadata=_h(
        "serve both the prefill and the decode service, so a planner can switch this worker's role at run time "
        "(SetRole; auto: on for prefill and decode workers, which have a KV transport anyway; off for colocated "
        "ones, since on starts a KV transport there too)", choices=["auto", "on", "off"]))
    drain_timeout_s: float = field(default=120.0, metadata=_h(
        "a role switch waits at most this long for the requests the worker holds to finish; past it the role "
        "stays as it was"))

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536 or not 0 <= self.transfer_port < 65536:
            raise ValueError("ports must be in [0, 65535]")
        if not -1 <= self.metrics_port < 65536:
            raise ValueError("metrics_port must be -1 (off) or in [0, 65535]")
        if self.reservation_timeout_s <= 0 or self.transfer_timeout_s <= 0:
            raise ValueError("timeouts must be > 0")
        if self.reservation_max_s < self.reservation_timeout_s:
            raise ValueError("reservation_max_s must be >= reservation_timeout_s")
        if self.reserve_headroom_tokens < 1:
            raise ValueError("reserve_headroom_tokens must be >= 1")
        if self.drain_timeout_s <= 0:
            raise ValueError("drain_timeout_s must be > 0")
        if self.transfer_lanes < 1:
            raise ValueError("transfer_lanes must be >= 1")
        if self.store_publish_hold_ms < 0:
            raise ValueError("store_publish_hold_ms must be >= 0")
        if self.store_publish_queue_blocks < 1:
            raise ValueError("store_publish_queue_blocks must be >= 1")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("give both tls_cert_file and tls_key_file, or neither")
