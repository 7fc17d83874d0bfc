"""Tokens recomputed per decode failover: decode publishing its generated blocks with the stream held
until each block is stored (the default), publishing without the hold, and not publishing.

For each mode a real cluster (router, 1 prefill, 2 decode, a store master and node): `--kills` streams,
each with its decode worker killed with SIGKILL after a random number of streamed tokens, at whatever
moment that is (no synchronisation with the publisher: a block still being put then is lost with the
worker). The router's `pdserve:failover_recomputed_tokens` histogram gives what each failover computed
again; the streamed tokens are checked against an offline fault-free run (greedy). The killed worker
is restarted before the next stream. Prints one markdown row per failover and a summary per mode, with
the gaps between streamed tokens before the kill (what the hold costs the stream).

    .venv/bin/python benchmarks/failover_resume.py [--kills 6]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
from integration_helpers import scrape, total  # noqa: E402

from pdserve.client import Client  # noqa: E402
from pdserve.cluster import ClusterSpec, start_cluster  # noqa: E402
from pdserve.engine.builtin_model import ensure_builtin_model  # noqa: E402
from pdserve.engine.config import EngineConfig  # noqa: E402
from pdserve.engine.llm_engine import LLMEngine  # noqa: E402
from pdserve.engine.sampling_params import SamplingParams  # noqa: E402

METRIC = "pdserve:failover_recomputed_tokens"


def _prompt(n: int, seed: int) -> list[int]:
    return [10 + (seed * 7919 + i * 104729) % 2000 for i in range(n)]


async def _one(cluster, prompt: list[int], max_tokens: int, kill_after: int
               ) -> tuple[list[int], list[str], int, list[float]]:
    tokens: list[int] = []
    arrivals: list[float] = []  # per message before the kill
    workers: list[str] = []
    killed_at = -1
    async with Client(cluster.router_address) as client:
        async for msg in client.generate(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                         timeout_s=120):
            tokens.extend(msg.token_ids)
            if killed_at < 0:
                arrivals.append(time.perf_counter())
            if msg.decode_worker and msg.decode_worker not in workers:
                workers.append(msg.decode_worker)
            if killed_at < 0 and len(tokens) >= kill_after:
                address = workers[0].rpartition("@")[2]
                victim = next(p for p in cluster.procs if p.address == address)
                killed_at = len(tokens)
                cluster.kill(victim.name)
                workers.append(f"killed:{victim.name}")
    return tokens, workers, killed_at, [b - a for a, b in zip(arrivals[1:], arrivals[2:])]  # after the first token


MODES = {"publish + hold": [], "publish, no hold": ["--store-publish-hold-ms", "0"],
         "no publish": ["--no-store-publish-generated"]}


async def run_mode(model: str, mode: str, args, reference) -> list[dict]:
    spec = ClusterSpec(model=model, num_prefill=1, num_decode=2, num_store_nodes=1,
                       router_args=["--local-prefill-threshold", "0", "--health-interval-s", "0.2",
                                    "--unhealthy-after", "2", "--max-retries", "3"],
                       worker_args=["--kv-cache-memory-mb", "64", "--max-num-batched-tokens", "128"],
                       decode_args=MODES[mode],
                       store_args=["--capacity-mb", "64"], log_dir=tempfile.mkdtemp(prefix="failover-bench-"))
    cluster = await asyncio.to_thread(start_cluster, spec, 180.0)
    rng = random.Random(args.seed)
    rows = []
    try:
        for k in range(args.kills):
            prompt = _prompt(args.prompt_len, seed=100 + k)
            before = scrape(f"{cluster.http_url}/metrics")
            kill_after = rng.randint(args.block_size, args.max_tokens - 50)
            tokens, workers, killed_at, gaps = await _one(cluster, prompt, args.max_tokens, kill_after)
            after = scrape(f"{cluster.http_url}/metrics")
            n = total(after, f"{METRIC}_count") - total(before, f"{METRIC}_count")
            recomputed = total(after, f"{METRIC}_sum") - total(before, f"{METRIC}_sum")
            holds = {k: total(after, f"pdserve:store_publish_{k}_total") - total(before, f"pdserve:store_publish_{k}_total")
                     for k in ("holds", "hold_seconds", "hold_timeouts")}  # the survivor's (the victim's are gone)
            rows.append(dict(mode=mode, gaps=gaps, holds=holds, killed_at=killed_at, failovers=int(n), recomputed=int(recomputed),
                             full=args.prompt_len + killed_at, identical=tokens == reference(prompt)))
            for p in cluster.procs:  # the killed worker comes back before the next stream
                if not p.alive():
                    cluster.respawn(p.name)
            await cluster.wait_ready(120)
    finally:
        cluster.stop()
    return rows


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=6, help="failovers per mode")
    ap.add_argument("--prompt-len", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=300)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--modes", default="", help=f"comma-separated subset of: {', '.join(MODES)}")
    args = ap.parse_args()
    model = str(ensure_builtin_model("tiny"))
    llm = LLMEngine(EngineConfig(model=model, kv_cache_memory_mb=64, max_num_batched_tokens=128))
    cache: dict[tuple, list[int]] = {}

    def reference(prompt: list[int]) -> list[int]:
        key = tuple(prompt)
        if key not in cache:
            params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
            cache[key] = llm.generate([prompt], params)[0].token_ids
        return cache[key]

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load0 = os.getloadavg()[0]
    rows = []
    modes = [m for m in MODES if m in args.modes.split(",")] if args.modes else list(MODES)
    for mode in modes:
        rows += await run_mode(model, mode, args, reference)
    load1 = os.getloadavg()[0]
    print(f"# decode failover recompute, {started}, load {load0:.1f} -> {load1:.1f}, prompt {args.prompt_len} "
          f"tokens, {args.max_tokens} generated, block {args.block_size}")
    print("| decode | killed after (tokens streamed) | failovers | tokens recomputed | "
          "full recompute would be | identical tokens |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['killed_at']} | {r['failovers']} | {r['recomputed']} | "
              f"{r['full']} | {r['identical']} |")
    for mode in modes:
        rs = [r for r in rows if r["mode"] == mode]
        rec = [r["recomputed"] for r in rs]
        gaps = sorted(g for r in rs for g in r["gaps"]) or [0.0]
        print(f"\n{mode}: {len(rs)} failovers, recomputed per failover mean "
              f"{sum(rec) / len(rec):.1f}, max {max(rec)} tokens; <= one block in "
              f"{sum(x <= args.block_size for x in rec)}/{len(rec)}; identical tokens {sum(r['identical'] for r in rs)}"
              f"/{len(rs)}; gap between streamed tokens before the kill: mean {1e3 * sum(gaps) / len(gaps):.1f} ms, "
              f"p50 {1e3 * gaps[len(gaps) // 2]:.1f}, p99 {1e3 * gaps[int(0.99 * (len(gaps) - 1))]:.1f}, "
              f"max {1e3 * gaps[-1]:.1f}; after the failovers, the surviving workers held {sum(r['holds']['holds'] for r in rs):.0f} "
              f"messages for {1e3 * sum(r['holds']['hold_seconds'] for r in rs):.0f} ms in all, "
              f"{sum(r['holds']['hold_timeouts'] for r in rs):.0f} holds timed out")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
