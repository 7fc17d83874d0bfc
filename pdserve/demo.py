"""`make demo`: make the built-in model, start a whole cluster (router, 1 prefill, 1 decode),
stream a few generations through the Python client, run a short load test (with the server's
time per phase), print what the workers did (KV bytes moved, local vs remote prefills, cache
and store hits, asked of the workers at that moment), and shut everything down."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\nclass Config:",
    "# Parse the command line and print a greeting\nimport argparse\n",
]


async def stream_generations(address: str) -> list[dict]:
    from pdserve.client import Client

    rows = []
    async with Client(address) as client:
        for prompt in PROMPTS:
            print(f"\n\033[1mprompt:\033[0m {prompt!r}\n\033[1moutput:\033[0m ", end="", flush=True)
            t0 = time.perf_counter()
            ttft = None
            n = 0
            last = None
            async for msg in client.generate(prompt, max_tokens=48, temperature=0.0, timeout_s=60):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                n += len(msg.token_ids)
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                last = msg if msg.finish_reason else last
                if msg.prefill_worker:
                    route = (msg.prefill_worker, msg.decode_worker)
            elapsed = time.perf_counter() - t0
            print()
            rows.append({"prompt_tokens": last.usage.prompt_tokens if last else 0, "tokens": n,
                         "ttft_ms": 1e3 * (ttft or 0), "tok_s": n / elapsed, "route": route})
        workers = await client.workers(refresh=True)  # fresh stats, not the router's last poll
    print("\n\033[1msummary\033[0m")
    print(f"{'prompt tok':>10} {'out tok':>8} {'TTFT ms':>8} {'tok/s':>7}  prefill -> decode")
    for r in rows:
        print(f"{r['prompt_tokens']:>10} {r['tokens']:>8} {r['ttft_ms']:>8.1f} {r['tok_s']:>7.1f}  "
              f"{r['route'][0]} -> {r['route'][1]}")
    print_worker_stats(workers)
    return rows


async def print_fresh_worker_stats(address: str) -> None:
    from pdserve.client import Client

    async with Client(address) as client:
        print_worker_stats(await client.workers(refresh=True))


def print_worker_stats(workers: list) -> None:
    """One line per worker: KV bytes moved, where prompts were prefilled, prefix-cache and store hits."""
    from pdserve.proto import pdserve_pb2 as pb

    for w in workers:
        s = w.stats
        role = pb.WorkerRole.Name(w.role).lower()
        hits = f"{s.prefix_cache_hits}/{s.prefix_cache_queries}" if s.prefix_cache_queries else "0/0"
        prefills = (f"prefilled {s.num_prompt_tokens_computed} prompt tok" if w.role == pb.PREFILL else
                    f"prefills local {s.num_local_prefills} remote {s.num_remote_prefills}")
        print(f"  {w.worker_id:<24} {role:<9} KV sent {s.kv_bytes_sent / 2**20:6.2f} MiB  received "
              f"{s.kv_bytes_received / 2**20:6.2f} MiB  {prefills}  prefix-cache hits {hits} blocks  "
              f"store hits {s.store_hit_tokens} tok")


def run_bench(address: str) -> int:
    """A short, bounded `pdserve bench` against the cluster's gRPC API."""
    import subprocess

    cmd = [sys.executable, "-m", "pdserve", "--log-level", "warning", "bench", "--backend", "pdserve-grpc",
           "--base-url", f"grpc://{address}", "--dataset", "random", "--num-prompts", "40",
           "--random-input-len", "128", "--random-output-len", "32", "--request-rate", "8",
           "--max-duration-s", "60", "--vocab-size", "2048"]
    print("\n\033[1mload test:\033[0m " + " ".join(cmd[3:]), flush=True)
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--colocated", action="store_true", help="demo the colocated mode instead")
    ap.add_argument("--no-bench", action="store_true", help="skip the short load test")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from pdserve.cluster import Cluster, ClusterSpec
    from pdserve.engine.builtin_model import ensure_builtin_model

    print("making the built-in tiny model (first run only) ...", flush=True)
    model = ensure_builtin_model("tiny")
    spec = ClusterSpec(model=str(model), num_prefill=0 if args.colocated else 1, num_decode=0 if args.colocated else 1,
                       num_colocated=1 if args.colocated else 0, log_level="warning",
                       num_store_nodes=0 if args.colocated else 1,
                       router_args=["--local-prefill-threshold", "0"])
    cluster = Cluster(spec)
    print(f"starting router + {'1 colocated worker' if args.colocated else '1 prefill + 1 decode + KV store'} "
          f"(logs: {cluster.log_dir}) ...", flush=True)
    t0 = time.perf_counter()
    rc = 0
    try:
        address = cluster.start(timeout_s=180)
        print(f"cluster up in {time.perf_counter() - t0:.1f} s; router gRPC at {address}, "
              f"OpenAI HTTP at {cluster.http_url}")
        for p in cluster.procs:
            print(f"  {p.name:<12} pid {p.pid}")
        asyncio.run(stream_generations(address))
        if not args.no_bench:
            rc = run_bench(address)
            print("\n\033[1mworkers after the load test\033[0m")
            asyncio.run(print_fresh_worker_stats(address))
    finally:
        print("\nshutting down ...", flush=True)
        cluster.stop()
    print("done.")
    return rc


if __name__ == "__main__":
    sys.exit(main())
