"""Start a whole pdserve cluster on this machine: router, prefill and decode workers (or colocated
workers), each its own process on 127.0.0.1, serving the built-in tiny model unless --model is
given. Prints where to connect; Ctrl-C stops everything."""

from __future__ import annotations

import argparse
import signal
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="", metavar="DIR", help="model directory (default: built-in tiny model)")
    parser.add_argument("--prefill", type=int, default=1, help="prefill workers (default: 1)")
    parser.add_argument("--decode", type=int, default=1, help="decode workers (default: 1)")
    parser.add_argument("--colocated", action="store_true",
                        help="serve with colocated workers (prefill + decode in one process) instead")
    parser.add_argument("--workers", type=int, default=1, help="colocated workers with --colocated (default: 1)")
    parser.add_argument("--host", default="127.0.0.1", help="address every process binds to (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50051, help="router gRPC port (default: 50051)")
    parser.add_argument("--http-port", type=int, default=8000,
                        help="router OpenAI HTTP API and /metrics port (0: a free one; -1: none; default: 8000)")
    parser.add_argument("--log-dir", default="", help="where process logs go (default: a new temp dir)")
    parser.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                        help="extra flag for every worker, e.g. --worker-arg=--kv-cache-memory-mb=256 (repeatable)")
    parser.add_argument("--router-arg", action="append", default=[], metavar="ARG",
                        help="extra flag for the router (repeatable)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the cluster (default: 180)")


def run(args: argparse.Namespace) -> int:
    from pdserve.cluster import Cluster, ClusterSpec

    spec = ClusterSpec(model=args.model, num_prefill=0 if args.colocated else args.prefill,
                       num_decode=0 if args.colocated else args.decode,
                       num_colocated=args.workers if args.colocated else 0, host=args.host, router_port=args.port,
                       http_port=args.http_port,
                       log_dir=args.log_dir, worker_args=args.worker_arg, router_args=args.router_arg,
                       log_level=args.log_level)
    cluster = Cluster(spec)
    print(f"starting pdserve ({'colocated' if args.colocated else 'disaggregated'}), logs in {cluster.log_dir} ...",
          file=sys.stderr)
    t0 = time.monotonic()
    try:
        address = cluster.start(timeout_s=args.timeout)
    except KeyboardInterrupt:
        cluster.stop()
        return 130
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"pdserve is up in {time.monotonic() - t0:.1f} s")
    for p in cluster.procs:
        metrics = f"  metrics {p.metrics_url}" if p.metrics_url else ""
        print(f"  {p.name:<12} pid {p.pid:<8} {p.address}{metrics}")
    print(f"\nconnect: gRPC {address}")
    print(f"  try:   pdserve generate --url {address} \"def fibonacci(n):\"")
    if cluster.http_url:
        print(f"         HTTP {cluster.http_url}/v1 (OpenAI-compatible)")
        print(f"  try:   curl {cluster.http_url}/v1/completions -H 'Content-Type: application/json' "
              f"-d '{{\"prompt\": \"def fibonacci(n):\", \"max_tokens\": 32}}'")
    print("Ctrl-C stops everything.")
    stopping = False

    def on_signal(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stopping:
            dead = [p for p in cluster.procs if not p.alive()]
            if dead:
                print(f"{dead[0].name} exited unexpectedly:\n{dead[0].log_tail()}", file=sys.stderr)
                break
            time.sleep(0.5)
    finally:
        print("stopping ...", file=sys.stderr)
        cluster.stop()
    return 0
