#!/usr/bin/env python3
"""Chaos run: a bounded load (Poisson arrivals, greedy, ignore_eos) against a cluster this script
starts itself, while it `kill -9`s workers (by the pids it started) at random times and restarts
them (same flags, new process; they re-register with the router). Every answer is compared with
a fault-free reference run of the same prompts on the same cluster before any kill.

Reports requests sent / completed / failed (by status) / token-mismatched, the kills, the router's
retries and whether the surviving workers ended with every KV block free. Goal: 0 lost, 0 mismatched.

    python benchmarks/chaos.py --num-requests 80 --rate 3 --kills 4
    python benchmarks/chaos.py --store-nodes 2 --kill-roles decode,prefill,store   # once the store is wired
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
import urllib.request
from dataclasses import dataclass, field

import grpc

from pdserve.client import Client
from pdserve.cluster import Cluster, ClusterSpec
from pdserve.loadtest.arrivals import arrival_offsets

# role name -> prefix of the Cluster's process names (a store kind is one more entry)
ROLE_PREFIX = {"decode": "decode-", "prefill": "prefill-", "store": "kvstore-node-"}


@dataclass
class Report:
    sent: int = 0
    completed: int = 0
    mismatched: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    kills: list[str] = field(default_factory=list)
    restarts: int = 0
    router_retries: float = 0.0
    reference_s: float = 0.0
    chaos_s: float = 0.0
    survivors_clean: bool = False

    @property
    def lost(self) -> int:
        return sum(self.failed.values())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=60, help="requests in the chaos run (default 60)")
    p.add_argument("--rate", type=float, default=3.0, help="mean arrivals per second, Poisson (default 3)")
    p.add_argument("--max-tokens", type=int, default=96, help="tokens generated per request (default 96)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=(40, 600), metavar=("MIN", "MAX"),
                   help="prompt length range in tokens (default 40 600)")
    p.add_argument("--num-prefill", type=int, default=2)
    p.add_argument("--num-decode", type=int, default=2)
    p.add_argument("--store-nodes", type=int, default=0, help="KV store nodes to start (0: no store)")
    p.add_argument("--kill-roles", default="decode,prefill",
                   help=f"comma-separated roles to kill, in turn, from: {', '.join(ROLE_PREFIX)}")
    p.add_argument("--kills", type=int, default=4, help="kill -9 events during the run (default 4)")
    p.add_argument("--restart-delay-s", type=float, default=1.0, help="a killed process stays down this long")
    p.add_argument("--request-timeout-s", type=float, default=120.0, help="deadline of each request")
    p.add_argument("--max-retries", type=int, default=3, help="router --max-retries")
    p.add_argument("--chunk-tokens", type=int, default=32,
                   help="workers' --max-num-batched-tokens: small chunks make prefills long enough to be hit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="", help="model directory (default: the built-in tiny model)")
    p.add_argument("--log-dir", default="", help="where process logs go (default: a temp dir)")
    p.add_argument("--json", default="", help="also write the report here as JSON")
    args = p.parse_args(argv)
    roles = [r for r in args.kill_roles.split(",") if r]
    unknown = set(roles) - set(ROLE_PREFIX)
    if unknown:
        p.error(f"unknown roles in --kill-roles: {', '.join(sorted(unknown))}")
    if "store" in roles and args.store_nodes < 2:
        p.error("killing store nodes needs --store-nodes >= 2 (one must survive)")
    args.roles = roles
    return args


def make_prompts(args: argparse.Namespace, vocab_size: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    lo, hi = args.prompt_len
    return [[rng.randrange(10, vocab_size) for _ in range(rng.randint(lo, hi))] for _ in range(args.num_requests)]


async def run_one(client: Client, prompt: list[int], args: argparse.Namespace) -> list[int] | str:
    """The generated token ids, or the status name it failed with."""
    try:
        r = await client.complete(prompt, max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True,
                                  timeout_s=args.request_timeout_s)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return r.token_ids if r.finish_reason == "length" else f"finish_reason={r.finish_reason}"


async def reference_run(client: Client, prompts: list[list[int]], args: argparse.Namespace) -> list[list[int]]:
    limit = asyncio.Semaphore(8)

    async def one(p: list[int]) -> list[int]:
        async with limit:
            out = await run_one(client, p, args)
        if isinstance(out, str):
            raise RuntimeError(f"the fault-free reference run failed: {out}")
        return out
    return await asyncio.gather(*(one(p) for p in prompts))


async def chaos_monkey(cluster: Cluster, args: argparse.Namespace, duration_s: float, report: Report,
                       rng: random.Random) -> None:
    """`args.kills` kill -9 events at random times over the run, each followed by a restart."""
    times = sorted(rng.uniform(0.05, 0.8) * duration_s for _ in range(args.kills))
    t0 = time.monotonic()
    for i, at in enumerate(times):
        await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
        role = args.roles[i % len(args.roles)]
        victims = [p for p in cluster.procs if p.name.startswith(ROLE_PREFIX[role]) and p.alive()]
        if len(victims) < 2:  # keep one of each role alive
            continue
        victim = rng.choice(victims)
        await asyncio.to_thread(cluster.kill, victim.name)
        report.kills.append(f"{time.monotonic() - t0:6.1f} s  kill -9 {victim.name} (pid {victim.pid})")
        print(report.kills[-1], flush=True)
        await asyncio.sleep(args.restart_delay_s)
        cluster.restart(victim.name)
        report.restarts += 1
        await cluster.wait_ready(120)


def router_retries(cluster: Cluster) -> float:
    text = urllib.request.urlopen(f"{cluster.http_url}/metrics", timeout=5).read().decode()
    return sum(float(v) for v in re.findall(r"^pdserve:router_retries(?:_total)?(?:\{[^}]*\})? (\S+)$", text, re.M))


async def survivors_clean(client: Client, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        workers = [w for w in await client.workers() if w.healthy]
        if workers and all(w.stats.num_free_kv_blocks == w.stats.num_kv_blocks and w.stats.num_reservations == 0
                           and w.stats.num_requests_active == 0 for w in workers):
            return True
        await asyncio.sleep(0.2)
    return False


async def chaos(cluster: Cluster, args: argparse.Namespace) -> Report:
    report = Report()
    rng = random.Random(args.seed + 1)
    async with Client(cluster.router_address) as client:
        info = await client.model_info()
        prompts = make_prompts(args, info.vocab_size)
        t = time.monotonic()
        expected = await reference_run(client, prompts, args)
        report.reference_s = time.monotonic() - t
        print(f"reference run: {len(prompts)} requests in {report.reference_s:.1f} s", flush=True)
        offsets = arrival_offsets("poisson", len(prompts), args.rate, seed=args.seed)

        async def send(i: int) -> None:
            await asyncio.sleep(offsets[i] - (time.monotonic() - t0))
            report.sent += 1
            out = await run_one(client, prompts[i], args)
            if isinstance(out, str):
                report.failed[out] = report.failed.get(out, 0) + 1
            elif out != expected[i]:
                report.mismatched += 1
            else:
                report.completed += 1

        t0 = time.monotonic()
        monkey = asyncio.create_task(chaos_monkey(cluster, args, offsets[-1] + 2.0, report, rng))
        await asyncio.gather(*(send(i) for i in range(len(prompts))))
        await monkey
        report.chaos_s = time.monotonic() - t0
        report.router_retries = router_retries(cluster)
        report.survivors_clean = await survivors_clean(client)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = ClusterSpec(model=args.model, num_prefill=args.num_prefill, num_decode=args.num_decode,
                       num_store_nodes=args.store_nodes, log_dir=args.log_dir, log_level="warning",
                       router_args=["--local-prefill-threshold", "0", "--health-interval-s", "0.2",
                                    "--unhealthy-after", "2", "--max-retries", str(args.max_retries)],
                       worker_args=["--max-num-batched-tokens", str(args.chunk_tokens), "--kv-cache-memory-mb", "128",
                                    "--reservation-timeout-s", "15", "--transfer-timeout-s", "10"])
    cluster = Cluster(spec)
    started = time.monotonic()
    cluster.start(timeout_s=240)
    try:
        print(f"cluster up in {time.monotonic() - started:.1f} s (logs in {cluster.log_dir})", flush=True)
        report = asyncio.run(chaos(cluster, args))
    finally:
        cluster.stop()
    print("\n".join([
        "", "chaos report", "------------",
        f"requests sent        {report.sent}",
        f"completed (matched)  {report.completed}",
        f"failed               {report.lost}  {report.failed or ''}",
        f"token-mismatched     {report.mismatched}",
        f"kills / restarts     {len(report.kills)} / {report.restarts}",
        *[f"  {k}" for k in report.kills],
        f"router retries       {report.router_retries:.0f}",
        f"survivors clean      {report.survivors_clean}  (every healthy worker: all KV blocks free, 0 reservations)",
        f"reference run        {report.reference_s:.1f} s; chaos run {report.chaos_s:.1f} s",
    ]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**report.__dict__, "lost": report.lost, "args": {k: v for k, v in vars(args).items()}}, f,
                      indent=2, default=str)
    return 0 if report.lost == 0 and report.mismatched == 0 and report.survivors_clean else 1


if __name__ == "__main__":
    sys.exit(main())
