"""Start a whole pdserve cluster on this machine: router, prefill and decode workers (or colocated
workers), each its own process on 127.0.0.1, serving the built-in tiny model unless --model is
given. Prints where to connect, then supervises: a process that exits is restarted with backoff
(`supervisor.py`) while the rest keep serving; Ctrl-C, or a crash loop, stops everything."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pdserve.kvstore.config import NodeConfig
from pdserve.settings import add_config_arguments, config_from_args
from pdserve.supervisor import RestartPolicy


def _h(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass(slots=True)
class UpConfig:
    model: str = field(default="", metadata=_h("model directory (empty: the built-in tiny model)", metavar="DIR"))
    prefill: int = field(default=1, metadata=_h("prefill workers"))
    decode: int = field(default=1, metadata=_h("decode workers"))
    colocated: bool = field(default=False, metadata=_h(
        "serve with colocated workers (prefill + decode in one process) instead"))
    workers: int = field(default=1, metadata=_h("colocated workers, with --colocated"))
    store_nodes: int = field(default=1, metadata=_h("KV cache store nodes, started with one store master (0: no store)"))
    store_memory_mb: int = field(default=NodeConfig.__dataclass_fields__["capacity_mb"].default, metadata=_h(
        "DRAM tier of each store node in MiB (default: twice a worker's default KV cache, so the store holds "
        "blocks the prefill workers' own caches have dropped)"))
    store_ssd_mb: int = field(default=NodeConfig.__dataclass_fields__["ssd_mb"].default, metadata=_h(
        "SSD tier of each store node in MiB, reserved on disk at start-up (0: DRAM only)"))
    store_ssd_dir: str = field(default="", metadata=_h(
        "directory of the store nodes' SSD tier files (default: kvstore-ssd in the log dir)", metavar="DIR"))
    host: str = field(default="127.0.0.1", metadata=_h("address every process binds to"))
    port: int = field(default=50051, metadata=_h("router gRPC port"))
    http_port: int = field(default=8000, metadata=_h("router OpenAI HTTP API and /metrics port (0: a free one; -1: none)"))
    log_dir: str = field(default="", metadata=_h("where process logs go (empty: a new temp dir)"))
    worker_args: str = field(default="", metadata=_h(
        "extra flags for every worker, shell-quoted, e.g. '--kv-cache-memory-mb 256'", metavar="ARGS"))
    prefill_args: str = field(default="", metadata=_h(
        "extra flags for the prefill workers only (after --worker-args): a heterogeneous pool, e.g. "
        "'--device cuda --num-threads 8 --kv-cache-memory-mb 1024' (--dtype must match the decode pool's: KV "
        "blocks are copied byte for byte)", metavar="ARGS"))
    decode_args: str = field(default="", metadata=_h(
        "extra flags for the decode (and colocated) workers only, e.g. '--kv-cache-memory-mb 8192'", metavar="ARGS"))
    router_args: str = field(default="", metadata=_h(
        "extra flags for the router, shell-quoted, e.g. '--planner slo' (docs/planner.md)", metavar="ARGS"))
    timeout_s: float = field(default=180.0, metadata=_h("seconds to wait for the cluster to be ready"))
    restart_backoff_s: float = field(default=0.5, metadata=_h(
        "a process that exits is started again after this delay, doubled per exit within --restart-window-s"))
    max_restarts: int = field(default=5, metadata=_h(
        "exits of one process within --restart-window-s beyond this are a crash loop: the cluster stops"))
    restart_window_s: float = field(default=60.0, metadata=_h("window of the crash-loop count, in seconds"))
    etcd: bool = field(default=False, metadata=_h(
        "start an etcd server (Debian's etcd-server) and run membership through it: every process registers "
        "under a lease, routers discover workers by watching, store masters elect a leader"))
    etcd_url: str = field(default="", metadata=_h("use this running etcd (http://host:port) instead of starting one",
                                                  metavar="URL"))
    routers: int = field(default=1, metadata=_h(
        "router replicas, each on its own port from --port on; clients take the comma-separated list and "
        "fail over between them"))
    store_masters: int = field(default=1, metadata=_h(
        "KV store masters (> 1 needs --etcd: one leads, the others stand by and take over when it dies)"))

    def __post_init__(self) -> None:
        if self.routers < 1 or self.store_masters < 1:
            raise ValueError("routers and store_masters must be >= 1")
        if self.store_masters > 1 and not (self.etcd or self.etcd_url):
            raise ValueError("--store-masters > 1 needs --etcd (or --etcd-url): masters elect their leader there")
        if min(self.prefill, self.decode, self.workers, self.store_nodes) < 0:
            raise ValueError("worker and store node counts must be >= 0")
        RestartPolicy(self.restart_backoff_s, max(8.0, self.restart_backoff_s), self.max_restarts,
                      self.restart_window_s)  # checks the restart settings
        if self.store_memory_mb < 1 or self.store_ssd_mb < 0:
            raise ValueError("store_memory_mb must be >= 1 and store_ssd_mb >= 0")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, UpConfig, title="cluster")


def store_node_args(c: UpConfig, log_dir: str) -> list[str]:
    args = ["--capacity-mb", str(c.store_memory_mb)]
    if c.store_ssd_mb:
        args += ["--ssd-dir", c.store_ssd_dir or str(Path(log_dir) / "kvstore-ssd"), "--ssd-mb", str(c.store_ssd_mb)]
    return args


def store_capacity_line(c: UpConfig, model_dir: str) -> str:
    """What each store tier holds, in tokens of this model's KV (float32), beside a worker's own cache."""
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.model_config import ModelConfig

    bytes_per_token = ModelConfig.from_dir(model_dir).kv_bytes_per_token
    worker_mb = EngineConfig.__dataclass_fields__["kv_cache_memory_mb"].default

    def tokens(mb: int) -> str:
        return f"{mb * 2**20 // bytes_per_token:,} tokens"

    ssd = f" + SSD {c.store_ssd_mb} MiB = {tokens(c.store_ssd_mb)}" if c.store_ssd_mb else ""
    return (f"  KV store: {c.store_nodes} node(s), each DRAM {c.store_memory_mb} MiB = {tokens(c.store_memory_mb)}"
            f"{ssd} (a worker's default KV cache: {worker_mb} MiB = {tokens(worker_mb)})")


def cluster_spec(c: UpConfig, log_dir: str, log_level: str):
    """The processes `pdserve up` runs for `c` (per-role worker flags included: heterogeneous pools)."""
    from pdserve.cluster import ClusterSpec

    return ClusterSpec(model=c.model, num_prefill=0 if c.colocated else c.prefill,
                       num_decode=0 if c.colocated else c.decode, num_colocated=c.workers if c.colocated else 0,
                       num_store_nodes=0 if c.colocated else c.store_nodes,
                       store_args=store_node_args(c, log_dir), host=c.host, router_port=c.port,
                       http_port=c.http_port, log_dir=log_dir, worker_args=shlex.split(c.worker_args),
                       prefill_args=shlex.split(c.prefill_args), decode_args=shlex.split(c.decode_args),
                       router_args=shlex.split(c.router_args), log_level=log_level, num_routers=c.routers,
                       num_store_masters=c.store_masters, etcd=c.etcd_url or ("start" if c.etcd else ""))


def run(args: argparse.Namespace) -> int:
    from pdserve.cluster import Cluster
    from pdserve.supervisor import CrashLoop, Supervisor

    c = config_from_args(UpConfig, args)
    log_dir = c.log_dir or tempfile.mkdtemp(prefix="pdserve-")
    spec = cluster_spec(c, log_dir, args.log_level)
    cluster = Cluster(spec)
    print(f"starting pdserve ({'colocated' if c.colocated else 'disaggregated'}), logs in {cluster.log_dir} ...",
          file=sys.stderr)
    t0 = time.monotonic()
    try:
        address = cluster.start(timeout_s=c.timeout_s)
    except KeyboardInterrupt:
        cluster.stop()
        return 130
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"pdserve is up in {time.monotonic() - t0:.1f} s")
    for p in cluster.procs:
        metrics = f"  metrics {p.metrics_url}" if p.metrics_url else ""
        print(f"  {p.name:<16} pid {p.pid:<8} {p.address}{metrics}")
    if cluster.etcd_url:
        print(f"  membership in etcd {cluster.etcd_url} (keys under /pdserve)")
    if cluster.store_address:
        print(store_capacity_line(c, cluster.spec.model))
    print(f"\nconnect: gRPC {address}" + ("  (router replicas: clients fail over between them)"
                                           if "," in address else ""))
    print(f"  try:   pdserve generate --url {address} \"def fibonacci(n):\"")
    if cluster.http_url:
        print(f"         HTTP {cluster.http_url}/v1 (OpenAI-compatible)")
        print(f"  try:   curl {cluster.http_url}/v1/completions -H 'Content-Type: application/json' "
              f"-d '{{\"prompt\": \"def fibonacci(n):\", \"max_tokens\": 32}}'")
    print(f"Ctrl-C stops everything. A process that exits is restarted; pids in {cluster.state_path}", flush=True)
    stopping = False

    def on_signal(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    policy = RestartPolicy(c.restart_backoff_s, max(8.0, c.restart_backoff_s), c.max_restarts, c.restart_window_s)
    supervisor = Supervisor(cluster, policy, report=lambda line: print(line, file=sys.stderr, flush=True))
    status = 0
    try:
        while not stopping:
            supervisor.poll()
            time.sleep(0.2)
    except CrashLoop as exc:
        print(f"error: crash loop, stopping the cluster: {exc}", file=sys.stderr)
        status = 1
    finally:
        print("stopping ...", file=sys.stderr, flush=True)
        cluster.stop()
    return status
