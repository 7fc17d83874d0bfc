"""Replays the Mooncake conversation trace through the KV cache store and compares the measured
prefix-hit ratio with the trace's theoretical (ideal LRU) ratio at the same capacity.

Scaling: one 512-token trace block (one hash id) = one store value (one KV block); capacity is
counted in blocks, like trace_stats.py's LRU columns. A request first loads its longest stored
prefix (get + lease), then publishes all its blocks (the master skips stored ones), in arrival order.

1. In process, the whole trace through `master_state.MasterState` (the real placement, watermark
   eviction and lease logic; one node of CAPACITY slots), for each --capacities value.
2. With real processes, the first --real-requests requests through `pdserve kvstore-master` and
   `pdserve kvstore-node` and a KVStoreClient moving small values (one layer, 16 tokens, 1 KiB) over
   UCX; every loaded block is checked byte for byte.

    .venv/bin/python benchmarks/kvstore_trace_replay.py [--trace PATH] [--capacities 1000 10000 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.util
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = REPO.parent / "shared/data/mooncake/conversation_trace.jsonl"
TRACE_BLOCK_TOKENS = 512
FP = b"trace-replay-fp0"


def load_trace_stats(trace: Path):
    """trace_stats.py from beside the trace (its hit_ratio is the reference computation)."""
    spec = importlib.util.spec_from_file_location("trace_stats", trace.parent / "trace_stats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def key_of(hash_id: int) -> bytes:
    return hashlib.sha256(FP + hash_id.to_bytes(8, "little")).digest()[:16]


def tokens_of_blocks(request: dict, num_blocks: int) -> int:
    """Prompt tokens in the first num_blocks blocks (the last block may be partial)."""
    return min(num_blocks * TRACE_BLOCK_TOKENS, request["input_length"])


def replay_in_process(reqs: list[dict], capacity: int, high: float, low: float) -> dict:
    from pdserve.kvstore.config import MasterConfig
    from pdserve.kvstore.master_state import MasterState
    from pdserve.kvstore.values import NodeInfo, ValueMeta

    meta = ValueMeta(4, "float32", (1,), FP)  # values of one slot each; only counts matter here
    state = MasterState(MasterConfig(high_watermark=high, low_watermark=low, node_timeout_s=1e9,
                                     heartbeat_interval_s=1.0), clock=lambda: 0.0)
    state.register_node(NodeInfo("n0", "n0:1", "n0:2", capacity * meta.nbytes, meta.nbytes), [])
    hits = total = saved_tokens = 0
    started = time.perf_counter()
    for r in reqs:
        keys = [key_of(h) for h in r["hash_ids"]]
        plan = state.get_start(keys, FP)
        num_hit = len(plan.locations)
        if plan.lease_id:
            state.get_done(plan.lease_id)
        put = state.put_start(keys, meta)
        if put.put_id:
            state.put_commit(put.put_id)
        hits += num_hit
        total += len(keys)
        saved_tokens += tokens_of_blocks(r, num_hit)
    return {"hits": hits, "blocks": total, "hit_ratio": hits / total, "saved_tokens": saved_tokens,
            "evictions": state.counters.num_evictions, "seconds": time.perf_counter() - started}


async def replay_real(reqs: list[dict], capacity_mb: int, log_dir: Path) -> dict:
    import torch

    from pdserve import rpc
    from pdserve.cluster import free_port, spawn_process
    from pdserve.engine.kv_cache import PagedKVCache
    from pdserve.kvstore.client import KVStoreClient
    from pdserve.transfer.ucx import UCXTransport
    from pdserve.proto import kvstore_pb2 as kpb
    from pdserve.proto import kvstore_pb2_grpc as kpb_grpc

    max_blocks = max(len(r["hash_ids"]) for r in reqs)
    # one layer, 16 tokens, 1 KV head of 8 floats: values of 1 KiB, so capacity_mb MiB = capacity_mb * 1024 blocks
    kv = PagedKVCache(1, max_blocks, 16, 1, 8)
    master_port, node_port = free_port(), free_port()
    env = {**os.environ, "UCX_WARN_UNUSED_ENV_VARS": "n"}
    procs = []
    for name, argv in [("master", ["kvstore-master", "--port", str(master_port)]),
                       ("node", ["kvstore-node", "--port", str(node_port), "--master", f"127.0.0.1:{master_port}",
                                 "--capacity-mb", str(capacity_mb)])]:
        procs.append(spawn_process([sys.executable, "-m", "pdserve", "--log-level", "warning", *argv],
                                   log_dir / f"{name}.log", env))
    agent = UCXTransport("127.0.0.1", 0, num_lanes=2, timeout_s=10.0)
    agent.register_buffer("kv", kv.kv)
    client = KVStoreClient(f"127.0.0.1:{master_port}", agent, kv, FP, timeout_s=10.0, staging_blocks=max_blocks)
    try:
        deadline = time.monotonic() + 60
        for port in (master_port, node_port):
            while not await rpc.is_serving(f"127.0.0.1:{port}"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"store not serving; logs in {log_dir}")
                await asyncio.sleep(0.05)
        await agent.start()
        await client.start()
        async with rpc.channel(f"127.0.0.1:{master_port}") as ch:  # until the node registered
            while not (await kpb_grpc.KVStoreMasterStub(ch).Stats(kpb.MasterStatsRequest(), timeout=5)).nodes:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"node never registered; logs in {log_dir}")
                await asyncio.sleep(0.05)
        hits = total = saved_tokens = corrupt = 0
        started = time.perf_counter()
        for r in reqs:
            ids = r["hash_ids"]
            keys = [key_of(h) for h in ids]
            block_ids = list(range(len(ids)))
            kv.kv.fill_(-1.0)
            num_hit = await client.load(keys, block_ids)
            for i in range(num_hit):  # a loaded block must hold exactly what was published for its hash id
                corrupt += int(not torch.all(kv.kv[:, :, i] == float(ids[i] % 1_000_003)))
            for i, h in enumerate(ids):
                kv.kv[:, :, i] = float(h % 1_000_003)
            client.publish(keys, block_ids)
            await client.wait_published()
            hits += num_hit
            total += len(ids)
            saved_tokens += tokens_of_blocks(r, num_hit)
        seconds = time.perf_counter() - started
        return {"hits": hits, "blocks": total, "hit_ratio": hits / total, "saved_tokens": saved_tokens,
                "corrupt_blocks": corrupt, "seconds": seconds, "capacity_blocks": capacity_mb * 1024,
                "bytes_loaded": client.stats.bytes_loaded, "failures": client.stats.num_failures,
                "dropped": client.stats.num_dropped_blocks}
    finally:
        await client.close()
        await agent.close()
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
        import ucxx

        ucxx.stop_notifier_thread()


def main() -> int:
    from pdserve.kvstore.config import MasterConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--capacities", type=int, nargs="*", default=[1000, 10000, 100000], help="store capacity in blocks")
    parser.add_argument("--high-watermark", type=float, default=MasterConfig().high_watermark)
    parser.add_argument("--low-watermark", type=float, default=MasterConfig().low_watermark)
    parser.add_argument("--real-requests", type=int, default=300, help="first N requests through real processes (0: skip)")
    parser.add_argument("--real-capacity-mb", type=int, default=1, help="node pool of the real run (1 KiB values)")
    parser.add_argument("--json", action="store_true", help="also print one JSON object per row")
    args = parser.parse_args()
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

    trace_stats = load_trace_stats(args.trace)
    reqs = sorted(trace_stats.load(str(args.trace)), key=lambda r: r["timestamp"])
    input_tokens = sum(r["input_length"] for r in reqs)
    print(f"trace: {args.trace} ({len(reqs)} requests, {input_tokens} prompt tokens); "
          f"watermarks {args.low_watermark}/{args.high_watermark}")
    print("| run | requests | capacity (blocks) | theoretical hit ratio | measured hit ratio | measured / theoretical "
          "| prefill tokens saved | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for capacity in args.capacities:
        theory = trace_stats.hit_ratio(reqs, capacity)
        m = replay_in_process(reqs, capacity, args.high_watermark, args.low_watermark)
        rows.append({"run": "master_state", "requests": len(reqs), "capacity": capacity, "theoretical": theory, **m})
    unbounded = trace_stats.hit_ratio(reqs)
    if args.real_requests > 0:
        subset = reqs[:args.real_requests]
        with tempfile.TemporaryDirectory(prefix="pdserve-kvstore-bench-") as tmp:
            m = asyncio.run(replay_real(subset, args.real_capacity_mb, Path(tmp)))
        theory = trace_stats.hit_ratio(subset, m["capacity_blocks"])
        rows.append({"run": "real master+node", "requests": len(subset), "capacity": m["capacity_blocks"],
                     "theoretical": theory, **m})
    for row in rows:
        ratio = row["hit_ratio"] / row["theoretical"] if row["theoretical"] else float("nan")
        row["measured_over_theoretical"] = ratio
        print(f"| {row['run']} | {row['requests']} | {row['capacity']} | {row['theoretical']:.4f} | "
              f"{row['hit_ratio']:.4f} | {ratio:.3f}x | {row['saved_tokens']:,} | {row['seconds']:.1f} |")
    print(f"unbounded-cache theoretical hit ratio (whole trace): {unbounded:.4f}")
    for row in rows:
        if row["run"] != "master_state":
            print(f"real run: {row['corrupt_blocks']} corrupt blocks, {row['failures']} failures, "
                  f"{row['dropped']} dropped, {row['bytes_loaded']:,} bytes loaded")
    if args.json:
        for row in rows:
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
