#!/usr/bin/env python3
"""Chaos run through `pdserve up` as users start it: a bounded load (Poisson arrivals, greedy,
ignore_eos) while this script `kill -9`s processes of the cluster at random times, by the pids
`pdserve up` lists in its processes.json; `pdserve up`'s supervisor restarts each one (it
re-registers). Every answer is compared with a fault-free reference run of the same prompts on the
same cluster before any kill.

Kill targets (--kill-roles, taken in turn): decode, prefill, store (a store node), master (the
leading store master), router (a router replica; needs --routers >= 2) and etcd (needs --etcd).
Reports requests sent / completed / failed (by status; a request streaming through a killed router
is counted apart: it may fail, at once, with UNAVAILABLE) / token-mismatched, the kills, the
routers' retries and whether the workers ended with every KV block free. Goal: 0 lost, 0 mismatched.

    python benchmarks/chaos.py --num-requests 80 --rate 3 --kills 4
    python benchmarks/chaos.py --store-nodes 2 --kill-roles decode,prefill,store,master
    python benchmarks/chaos.py --etcd --routers 2 --store-masters 2 --store-nodes 2 \\
        --kill-roles decode,prefill,store,master,router,etcd --kills 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shlex
import sys
import time
import urllib.request
from dataclasses import dataclass, field

import grpc

from pdserve.client import Client
from pdserve.loadtest.arrivals import arrival_offsets
from pdserve.up_process import UpProcess

# role -> prefix of `pdserve up`'s process names ("master" is resolved to the leader)
ROLE_PREFIX = {"decode": "decode-", "prefill": "prefill-", "store": "kvstore-node-", "master": "kvstore-master",
               "router": "router-", "etcd": "etcd"}


@dataclass
class Report:
    sent: int = 0
    completed: int = 0
    mismatched: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    failed_on_killed_router: int = 0  # UNAVAILABLE while streaming through a router that was killed
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
    p.add_argument("--store-masters", type=int, default=1, help="KV store masters (> 1 needs --etcd)")
    p.add_argument("--routers", type=int, default=1, help="router replicas")
    p.add_argument("--etcd", action="store_true", help="pdserve up --etcd: membership through a real etcd")
    p.add_argument("--kill-roles", default="decode,prefill",
                   help=f"comma-separated roles to kill, in turn, from: {', '.join(ROLE_PREFIX)}")
    p.add_argument("--kills", type=int, default=4, help="kill -9 events during the run (default 4)")
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
    if "master" in roles and args.store_nodes < 1:
        p.error("killing the store master needs a store (--store-nodes >= 1)")
    if "router" in roles and args.routers < 2:
        p.error("killing a router needs --routers >= 2")
    if "etcd" in roles and not args.etcd:
        p.error("killing etcd needs --etcd")
    args.roles = roles
    return args


def up_args(args: argparse.Namespace) -> list[str]:
    router = ["--local-prefill-threshold", "0", "--health-interval-s", "0.2", "--unhealthy-after", "2",
              "--max-retries", str(args.max_retries)]
    worker = ["--max-num-batched-tokens", str(args.chunk_tokens), "--kv-cache-memory-mb", "128",
              "--reservation-timeout-s", "15", "--transfer-timeout-s", "10"]
    out = ["--prefill", str(args.num_prefill), "--decode", str(args.num_decode), "--store-nodes",
           str(args.store_nodes), "--store-masters", str(args.store_masters), "--routers", str(args.routers),
           "--http-port", "0", "--router-args", shlex.join(router), "--worker-args", shlex.join(worker),
           "--restart-backoff-s", "0.5", "--max-restarts", str(args.kills + 2)]
    if args.etcd:
        out.append("--etcd")
    if args.store_nodes:
        out += ["--store-memory-mb", "256"]
    if args.model:
        out += ["--model", args.model]
    return out


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


async def leader_master(up: UpProcess) -> str:
    """The name of the store master holding the etcd leader key (the only master without etcd)."""
    procs = up.processes()
    masters = [n for n in procs if n.startswith("kvstore-master")]
    if "etcd" not in procs or len(masters) == 1:
        return masters[0]
    from pdserve.membership import Etcd, EtcdConfig

    etcd = Etcd(EtcdConfig(etcd=procs["etcd"]["address"]))
    try:
        got = await etcd.client.get(b"/pdserve/kvstore/leader")
    finally:
        await etcd.close()
    address = got.value.decode() if got is not None else ""
    return next((n for n in masters if procs[n]["address"] == address), "")


async def wait_all_routers(up: UpProcess, num_workers: int) -> None:
    for address in up.state()["router"].split(","):
        await up.wait_ready(num_workers, timeout_s=180, router=address)


async def chaos_monkey(up: UpProcess, args: argparse.Namespace, duration_s: float, report: Report,
                       rng: random.Random, router_kills: list[float]) -> None:
    """`args.kills` kill -9 events at random times over the run; `pdserve up` restarts each."""
    times = sorted(rng.uniform(0.05, 0.8) * duration_s for _ in range(args.kills))
    t0 = time.monotonic()
    num_workers = args.num_prefill + args.num_decode
    for i, at in enumerate(times):
        await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
        role = args.roles[i % len(args.roles)]
        if role == "master":
            victims = [await leader_master(up)]
        else:
            victims = [n for n in up.processes() if n.startswith(ROLE_PREFIX[role])]
            if role in ("decode", "prefill", "store", "router") and len(victims) < 2:
                continue  # keep one of each alive
        victim = rng.choice([v for v in victims if v])
        if role == "router":
            router_kills.append(time.monotonic())
        pid = up.kill(victim)
        report.kills.append(f"{time.monotonic() - t0:6.1f} s  kill -9 {victim} (pid {pid})")
        print(report.kills[-1], flush=True)
        await up.wait_restarted(victim, pid)
        report.restarts += 1
        await wait_all_routers(up, num_workers)


def router_retries(up: UpProcess) -> float:
    total = 0.0
    for name, proc in up.processes().items():
        if name.startswith("router") and proc.get("metrics_url"):
            text = urllib.request.urlopen(proc["metrics_url"], timeout=5).read().decode()
            total += sum(float(v) for v in re.findall(
                r"^pdserve:router_retries(?:_total)?(?:\{[^}]*\})? (\S+)$", text, re.M))
    return total


async def survivors_clean(client: Client, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        workers = [w for w in await client.workers() if w.healthy]
        if workers and all(w.stats.num_free_kv_blocks == w.stats.num_kv_blocks and w.stats.num_reservations == 0
                           and w.stats.num_requests_active == 0 for w in workers):
            return True
        await asyncio.sleep(0.2)
    for w in workers:
        s = w.stats
        print(f"  not clean? {w.worker_id}: {s.num_kv_blocks - s.num_free_kv_blocks} blocks used, "
              f"{s.num_reservations} reservations, {s.num_requests_active} requests", flush=True)
    return False


async def chaos(up: UpProcess, args: argparse.Namespace) -> Report:
    report = Report()
    rng = random.Random(args.seed + 1)
    router_kills: list[float] = []
    async with Client(up.state()["router"]) as client:
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
            started = time.monotonic()
            out = await run_one(client, prompts[i], args)
            if isinstance(out, str):
                if out == "UNAVAILABLE" and any(started <= k <= time.monotonic() for k in router_kills):
                    report.failed_on_killed_router += 1
                else:
                    report.failed[out] = report.failed.get(out, 0) + 1
            elif out != expected[i]:
                report.mismatched += 1
            else:
                report.completed += 1

        t0 = time.monotonic()
        monkey = asyncio.create_task(chaos_monkey(up, args, offsets[-1] + 2.0, report, rng, router_kills))
        await asyncio.gather(*(send(i) for i in range(len(prompts))))
        await monkey
        report.chaos_s = time.monotonic() - t0
        report.router_retries = router_retries(up)
        report.survivors_clean = await survivors_clean(client)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    up = UpProcess(up_args(args), log_dir=args.log_dir, log_level="warning")
    print("pdserve up " + shlex.join(up.argv[up.argv.index("up") + 1:]), flush=True)
    started = time.monotonic()
    up.start()
    try:
        asyncio.run(up.wait_ready(args.num_prefill + args.num_decode, timeout_s=240))
        asyncio.run(wait_all_routers(up, args.num_prefill + args.num_decode))
        print(f"cluster up in {time.monotonic() - started:.1f} s (logs in {up.log_dir})", flush=True)
        report = asyncio.run(chaos(up, args))
    finally:
        status = up.stop()
    print("\n".join([
        "", "chaos report", "------------",
        f"requests sent        {report.sent}",
        f"completed (matched)  {report.completed}",
        f"failed               {report.lost}  {report.failed or ''}",
        f"failed on a killed router (UNAVAILABLE at once, allowed)  {report.failed_on_killed_router}",
        f"token-mismatched     {report.mismatched}",
        f"kills / restarts     {len(report.kills)} / {report.restarts}  (restarted by pdserve up's supervisor)",
        *[f"  {k}" for k in report.kills],
        f"router retries       {report.router_retries:.0f}  (counters of the routers alive at the end)",
        f"survivors clean      {report.survivors_clean}  (every healthy worker: all KV blocks free, 0 reservations)",
        f"reference run        {report.reference_s:.1f} s; chaos run {report.chaos_s:.1f} s",
        f"pdserve up exit      {status}  (Ctrl-C: clean stop)",
    ]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**report.__dict__, "lost": report.lost, "args": {k: v for k, v in vars(args).items()}}, f,
                      indent=2, default=str)
    return 0 if report.lost == 0 and report.mismatched == 0 and report.survivors_clean and status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
