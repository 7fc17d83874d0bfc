#!/usr/bin/env python3
"""What a user sees when one process of `pdserve up` dies under `pdserve bench`: one cluster started
as users start it, then per target a bounded `pdserve bench` run (its own process, gRPC backend)
during which this script `kill -9`s the target `--kill-after-s` seconds in, by the pid in
`pdserve up`'s processes.json. `pdserve up` restarts it. A first run without a kill is the baseline.

Per run it prints requests sent / completed / failed (by error) from bench's JSON, and for a store
master kill how long until a master answered again and until it held as many keys as before.

    python benchmarks/up_kill_bench.py --targets decode-0,prefill-0,kvstore-node-0,kvstore-master
    python benchmarks/up_kill_bench.py --etcd --routers 2 --store-masters 2 --targets router-0,master-leader,etcd
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from pdserve import rpc
from pdserve.proto import kvstore_pb2 as kpb
from pdserve.proto import kvstore_pb2_grpc as kpb_grpc
from pdserve.up_process import UpProcess

sys.path.insert(0, str(Path(__file__).parent))
from chaos import leader_master, wait_all_routers  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="decode-0,prefill-0,kvstore-node-0,kvstore-master",
                   help="process names to kill, one bench run each; master-leader: the leading store master")
    p.add_argument("--prefill", type=int, default=2)
    p.add_argument("--decode", type=int, default=2)
    p.add_argument("--store-nodes", type=int, default=2)
    p.add_argument("--store-masters", type=int, default=1)
    p.add_argument("--routers", type=int, default=1)
    p.add_argument("--etcd", action="store_true")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--request-rate", type=float, default=6.0)
    p.add_argument("--kill-after-s", type=float, default=10.0)
    p.add_argument("--bench-args", default="--dataset shared-prefix --vocab-size 2000 --max-duration-s 150",
                   help="more pdserve bench flags, shell-quoted")
    p.add_argument("--log-dir", default="")
    p.add_argument("--json", default="", help="also write the rows here")
    return p.parse_args(argv)


async def leader_stats(masters: str) -> kpb.MasterStats | None:
    async with rpc.channel(masters) as ch:
        try:
            return await kpb_grpc.KVStoreMasterStub(ch).Stats(kpb.MasterStatsRequest(), timeout=1.0)
        except grpc.aio.AioRpcError:
            return None


async def watch_master(masters: str, keys_before: int, timeout_s: float = 60.0) -> tuple[float, float]:
    """(seconds until a master answers, seconds until it holds keys_before keys), from now."""
    t0 = time.monotonic()
    answered = back = float("nan")
    while time.monotonic() - t0 < timeout_s:
        stats = await leader_stats(masters)
        now = time.monotonic() - t0
        if stats is not None:
            answered = answered if answered == answered else now
            if stats.num_keys >= keys_before:
                back = now
                break
        await asyncio.sleep(0.1)
    return answered, back


async def one_run(up: UpProcess, args: argparse.Namespace, target: str, out_dir: Path, num_workers: int) -> dict:
    result_json = out_dir / f"bench-{target or 'baseline'}.json"
    cmd = [sys.executable, "-m", "pdserve", "--log-level", "warning", "bench", "--backend", "pdserve-grpc",
           "--base-url", f"grpc://{up.state()['router']}", "--num-prompts", str(args.num_prompts),
           "--request-rate", str(args.request_rate), "--result-json", str(result_json), "--no-progress",
           *shlex.split(args.bench_args)]
    bench = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    row: dict = {"target": target or "(none)"}
    try:
        masters = up.state()["kvstore_master"]
        if target:
            await asyncio.sleep(args.kill_after_s)
            before = await leader_stats(masters) if masters else None
            name = await leader_master(up) if target == "master-leader" else target
            pid = up.kill(name)
            row["killed"] = f"{name} (pid {pid})"
            if name.startswith("kvstore-master") and before is not None:
                row["master_answers_s"], row["keys_back_s"] = await watch_master(masters, before.num_keys)
                row["keys_before"] = before.num_keys
            await up.wait_restarted(name, pid)
        await asyncio.to_thread(bench.wait, 600)
    finally:
        if bench.poll() is None:
            bench.kill()
    summary = json.loads(result_json.read_text())["summary"]
    row.update(sent=summary["num_sent"], completed=summary["num_completed"], failed=summary["num_failed"],
               cancelled=summary["num_cancelled"], errors=summary.get("errors", {}))
    await wait_all_routers(up, num_workers)
    return row


async def main_async(args: argparse.Namespace) -> list[dict]:
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="pdserve-killbench-"))
    up_args = ["--prefill", str(args.prefill), "--decode", str(args.decode), "--store-nodes", str(args.store_nodes),
               "--store-masters", str(args.store_masters), "--routers", str(args.routers), "--http-port", "0",
               *(["--etcd"] if args.etcd else [])]
    up = UpProcess(up_args, log_dir=str(log_dir / "cluster"), log_level="warning").start()
    print("pdserve up " + shlex.join(up_args), flush=True)
    rows = []
    try:
        await up.wait_ready(args.prefill + args.decode)
        await wait_all_routers(up, args.prefill + args.decode)
        for target in ["", *[t for t in args.targets.split(",") if t]]:
            row = await one_run(up, args, target, log_dir, args.prefill + args.decode)
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        status = up.stop()
    print(f"pdserve up exited {status}; logs in {log_dir}")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = asyncio.run(main_async(args))
    print(f"\n{'killed':<34} {'sent':>5} {'done':>5} {'failed':>6}  errors / master takeover")
    for r in rows:
        extra = r["errors"] or ""
        if "master_answers_s" in r:
            extra = f"{extra} master answers after {r['master_answers_s']:.1f} s, {r['keys_before']} keys back " \
                    f"after {r['keys_back_s']:.1f} s"
        print(f"{r.get('killed', '(no kill: baseline)'):<34} {r['sent']:>5} {r['completed']:>5} "
              f"{r['failed'] + r['cancelled']:>6}  {extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
