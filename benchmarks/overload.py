#!/usr/bin/env python3
"""Overload: a small disaggregated cluster (router + 1 prefill + 1 decode, tiny built-in model)
offered 1x, 3x and 10x its measured capacity, with admission control on and off.

Capacity C (completed requests/s) comes from a short closed-loop calibration run. Each load run
sends fixed-length prompts with Poisson arrivals at k*C for `--run-s` seconds (then `--grace-s`
for admitted requests to finish; what is still running is cut off and counted as cancelled).
Admission on: `--max-inflight-requests` = ceil(headroom * C * calibration mean E2E) (Little's law)
and, unless `--slo-factor 0`, `--ttft-slo-ms` = slo_factor * calibration p50 TTFT. Admission off:
both limits out of reach. Per run: offered rate, sent, admitted, rejected (RESOURCE_EXHAUSTED, by
reason), completed, p50/p99 TTFT and E2E of completed requests, and the summed resident memory
(VmRSS of the pids the cluster started) before and after. The ratios are computed from runs made
side by side in one invocation.

    python benchmarks/overload.py                      # ~6 minutes on a 2-core VM
    python benchmarks/overload.py --run-s 10 --multipliers 1 10 --json /tmp/overload.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from pdserve.client import Client
from pdserve.cluster import Cluster, ClusterSpec
from pdserve.loadtest.config import BenchConfig
from pdserve.loadtest.runner import BenchResult, run_benchmark

REJECTED_KIND = "grpc_resource_exhausted"
UNLIMITED_INFLIGHT = 1_000_000


@dataclass
class RunRow:
    mode: str  # "on" | "off"
    multiplier: float
    offered_rps: float
    sent: int
    admitted: int  # sent and not rejected
    rejected: int
    rejected_by: dict[str, int]
    completed: int
    cancelled: int  # admitted, still running when the run's time limit came
    other_errors: dict[str, int]
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    e2e_p50_ms: float | None
    e2e_p99_ms: float | None
    rss_start_mib: float
    rss_end_mib: float
    rss_by_proc_mib: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (start, end)
    drained: bool = True  # every KV block free again after the run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-len", type=int, default=512, help="tokens per prompt, fixed (default 512)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (default 32)")
    p.add_argument("--calibration-s", type=float, default=15.0, help="closed-loop calibration length (default 15)")
    p.add_argument("--calibration-concurrency", type=int, default=8,
                   help="requests kept in flight during calibration (default 8)")
    p.add_argument("--multipliers", type=float, nargs="+", default=[1.0, 3.0, 10.0],
                   help="offered load as multiples of the measured capacity (default 1 3 10)")
    p.add_argument("--run-s", type=float, default=20.0, help="seconds of arrivals per run (default 20)")
    p.add_argument("--grace-s", type=float, default=10.0,
                   help="after the arrivals, seconds admitted requests get to finish (default 10)")
    p.add_argument("--headroom", type=float, default=2.0,
                   help="in-flight limit = ceil(headroom * C * mean E2E at calibration) (default 2)")
    p.add_argument("--slo-factor", type=float, default=4.0,
                   help="TTFT SLO = this * calibration p50 TTFT (0: no SLO, in-flight limit only) (default 4)")
    p.add_argument("--modes", default="on,off", help="admission modes to run, in order (default on,off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drain-timeout-s", type=float, default=60.0, help="bound on waiting for KV to be freed")
    p.add_argument("--log-dir", default="", help="process logs (default: a temporary directory)")
    p.add_argument("--json", default="", help="write the rows and settings here")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(args.modes) <= {"on", "off"} or not args.modes:
        p.error("--modes takes on, off or both")
    if args.prompt_len < 1 or args.max_tokens < 1 or args.run_s <= 0 or args.calibration_s <= 0:
        p.error("lengths and durations must be positive")
    return args


def rss_mib(pid: int) -> float:
    """Resident memory of one process (VmRSS from /proc/PID/status), MiB; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return 0.0


def cluster_rss(cluster: Cluster) -> dict[str, float]:
    return {p.name: rss_mib(p.pid) for p in cluster.procs}


def start_cluster(args: argparse.Namespace, router_args: list[str], log_dir: str) -> Cluster:
    spec = ClusterSpec(num_prefill=1, num_decode=1, log_dir=log_dir, log_level="warning",
                       router_args=["--local-prefill-threshold", "0", *router_args])
    cluster = Cluster(spec)
    cluster.start(timeout_s=180.0)
    try:
        asyncio.run(warm_up(args, cluster))
    except BaseException:
        cluster.stop()
        raise
    return cluster


async def warm_up(args: argparse.Namespace, cluster: Cluster, num_requests: int = 4) -> None:
    """A few sequential requests, so that no run pays for a fresh process's first forward passes."""
    async with Client(cluster.router_address) as client:
        for i in range(num_requests):
            await client.complete([3 + (i + j) % 1000 for j in range(args.prompt_len)], max_tokens=args.max_tokens,
                                  temperature=0, ignore_eos=True, timeout_s=120.0)


async def wait_drained(cluster: Cluster, timeout_s: float) -> bool:
    """Poll (bounded) until every worker holds no KV block, reservation or request."""
    deadline = time.monotonic() + timeout_s
    async with Client(cluster.router_address) as client:
        while time.monotonic() < deadline:
            workers = await client.workers()
            if workers and all(w.stats.num_free_kv_blocks == w.stats.num_kv_blocks and w.stats.num_reservations == 0
                               and w.stats.num_requests_active == 0 for w in workers):
                return True
            await asyncio.sleep(0.2)
    return False


def bench_config(args: argparse.Namespace, cluster: Cluster, **overrides) -> BenchConfig:
    overrides.setdefault("seed", args.seed)
    return BenchConfig(base_url=f"grpc://{cluster.router_address}", backend="pdserve-grpc", dataset="random",
                       random_input_len=args.prompt_len, random_output_len=args.max_tokens, random_range_ratio=0.0,
                       temperature=0.0, ignore_eos=True, progress=False,
                       request_timeout_s=args.run_s + args.grace_s + 30.0, **overrides)


@dataclass
class Calibration:
    capacity_rps: float
    mean_e2e_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    completed: int
    duration_s: float


def calibrate(args: argparse.Namespace, cluster: Cluster) -> Calibration:
    """Closed loop at fixed concurrency; C = completed / duration."""
    n = max(4 * args.calibration_concurrency, 400)
    result = asyncio.run(run_benchmark(bench_config(
        args, cluster, num_prompts=n, max_concurrency=args.calibration_concurrency,
        max_duration_s=args.calibration_s, seed=args.seed + 1000)))
    ok = [r for r in result.results if r.success]
    if not ok:
        raise RuntimeError(f"calibration completed nothing: {result.summary.errors}")
    s = result.summary
    ttft = s.latency["ttft"]
    return Calibration(capacity_rps=len(ok) / s.duration_s, mean_e2e_s=sum(r.e2e_s for r in ok) / len(ok),
                       ttft_p50_ms=ttft.percentiles_ms["p50"], ttft_p99_ms=ttft.percentiles_ms["p99"],
                       completed=len(ok), duration_s=s.duration_s)


def rejection_reason(error: str) -> str:
    if "SLO" in error:
        return "ttft_slo"
    if "in flight" in error:
        return "inflight"
    if "KV blocks" in error:
        return "kv_blocks"
    return "other"


def percentile_ms(values_s: list[float], p: float) -> float | None:
    if not values_s:
        return None
    values = sorted(values_s)
    k = (len(values) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return 1e3 * (values[lo] + (values[hi] - values[lo]) * (k - lo))


def load_run(args: argparse.Namespace, cluster: Cluster, mode: str, multiplier: float,
             capacity_rps: float) -> RunRow:
    rate = multiplier * capacity_rps
    rss_start = cluster_rss(cluster)
    result: BenchResult = asyncio.run(run_benchmark(bench_config(
        args, cluster, num_prompts=max(1, math.ceil(rate * args.run_s)), request_rate=rate, arrival="poisson",
        max_duration_s=args.run_s + args.grace_s, seed=args.seed + int(10 * multiplier))))
    drained = asyncio.run(wait_drained(cluster, args.drain_timeout_s))
    rss_end = cluster_rss(cluster)
    rejected = [r for r in result.results if r.error_kind == REJECTED_KIND]
    rejected_by: dict[str, int] = {}
    for r in rejected:
        reason = rejection_reason(r.error)
        rejected_by[reason] = rejected_by.get(reason, 0) + 1
    ok = [r for r in result.results if r.success]
    others: dict[str, int] = {}
    for r in result.results:
        if not r.success and r.error_kind not in (REJECTED_KIND, "cancelled"):
            others[r.error_kind] = others.get(r.error_kind, 0) + 1
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    e2es = [r.e2e_s for r in ok if r.e2e_s is not None]
    return RunRow(mode=mode, multiplier=multiplier, offered_rps=rate, sent=len(result.results),
                  admitted=len(result.results) - len(rejected), rejected=len(rejected), rejected_by=rejected_by,
                  completed=len(ok), cancelled=sum(1 for r in result.results if r.error_kind == "cancelled"),
                  other_errors=others, ttft_p50_ms=percentile_ms(ttfts, 50), ttft_p99_ms=percentile_ms(ttfts, 99),
                  e2e_p50_ms=percentile_ms(e2es, 50), e2e_p99_ms=percentile_ms(e2es, 99),
                  rss_start_mib=sum(rss_start.values()), rss_end_mib=sum(rss_end.values()),
                  rss_by_proc_mib={k: (rss_start[k], rss_end.get(k, 0.0)) for k in rss_start}, drained=drained)


def fmt(v: float | None, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[RunRow]) -> None:
    head = (f"{'admission':<9} {'load':>5} {'offered/s':>9} {'sent':>5} {'admit':>5} {'reject':>6} {'done':>5} "
            f"{'cut':>4} {'TTFT p50':>8} {'TTFT p99':>8} {'E2E p50':>8} {'E2E p99':>8} {'RSS start':>9} {'RSS end':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.mode:<9} {r.multiplier:>4g}x {r.offered_rps:>9.2f} {r.sent:>5} {r.admitted:>5} {r.rejected:>6} "
              f"{r.completed:>5} {r.cancelled:>4} {fmt(r.ttft_p50_ms):>8} {fmt(r.ttft_p99_ms):>8} "
              f"{fmt(r.e2e_p50_ms):>8} {fmt(r.e2e_p99_ms):>8} {r.rss_start_mib:>9.0f} {r.rss_end_mib:>8.0f}")
    print("(latencies in ms, of completed requests; RSS in MiB, router + workers summed; cut = admitted but "
          "still running at the time limit)")
    for r in rows:
        extra = [f"rejected by {r.rejected_by}"] if r.rejected_by else []
        extra += [f"other errors {r.other_errors}"] if r.other_errors else []
        extra += [] if r.drained else ["NOT drained: KV blocks still held after the run"]
        if extra:
            print(f"  {r.mode} {r.multiplier:g}x: " + "; ".join(extra))


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def print_ratios(rows: list[RunRow]) -> None:
    by = {(r.mode, r.multiplier): r for r in rows}
    lo, hi = min(r.multiplier for r in rows), max(r.multiplier for r in rows)
    print(f"\nratios ({hi:g}x vs {lo:g}x, same invocation)")
    for mode in ("on", "off"):
        a, b = by.get((mode, hi)), by.get((mode, lo))
        if a is None or b is None:
            continue
        print(f"  admission {mode:<3}: TTFT p99 {ratio(a.ttft_p99_ms, b.ttft_p99_ms)}x, "
              f"E2E p99 {ratio(a.e2e_p99_ms, b.e2e_p99_ms)}x, "
              f"completed {ratio(a.completed, b.completed)}x")
    for mode in ("on", "off"):
        mine = [r for r in rows if r.mode == mode]
        if mine:
            first, last = mine[0], mine[-1]
            print(f"  admission {mode:<3}: RSS {first.rss_start_mib:.0f} -> {last.rss_end_mib:.0f} MiB over its runs "
                  f"({ratio(last.rss_end_mib, first.rss_start_mib)}x); largest single-run growth "
                  f"{max(r.rss_end_mib - r.rss_start_mib for r in mine):+.0f} MiB")
    on, off = by.get(("on", hi)), by.get(("off", hi))
    if on and off:
        print(f"  at {hi:g}x, on vs off: TTFT p99 {ratio(on.ttft_p99_ms, off.ttft_p99_ms)}x, "
              f"E2E p99 {ratio(on.e2e_p99_ms, off.e2e_p99_ms)}x")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    print(f"started {started}; load average {os.getloadavg()}", flush=True)
    rows: list[RunRow] = []
    unlimited = ["--max-inflight-requests", str(UNLIMITED_INFLIGHT)]
    calibration: Calibration | None = None
    limits: list[str] = []
    for mode in args.modes:
        log_dir = os.path.join(args.log_dir, mode) if args.log_dir else ""
        if calibration is None:  # calibrate on an unlimited router (the "off" one when it runs first)
            cluster = start_cluster(args, unlimited, os.path.join(log_dir, "calibration") if log_dir else "")
            try:
                calibration = calibrate(args, cluster)
                if not asyncio.run(wait_drained(cluster, args.drain_timeout_s)):
                    print("warning: calibration left KV blocks held", flush=True)
            except BaseException:
                cluster.stop()
                raise
            if mode == "on":
                cluster.stop()
            limits = admission_limits(args, calibration)
            print(f"calibration: C = {calibration.capacity_rps:.2f} req/s ({calibration.completed} completed in "
                  f"{calibration.duration_s:.1f} s at concurrency {args.calibration_concurrency}), mean E2E "
                  f"{1e3 * calibration.mean_e2e_s:.0f} ms, TTFT p50 {calibration.ttft_p50_ms:.0f} ms, "
                  f"p99 {calibration.ttft_p99_ms:.0f} ms; load average {os.getloadavg()}", flush=True)
            if mode == "on":
                cluster = start_cluster(args, limits, log_dir)
        else:
            cluster = start_cluster(args, limits if mode == "on" else unlimited, log_dir)
        try:
            print(f"admission {mode}: router {' '.join(limits if mode == 'on' else unlimited)}", flush=True)
            for k in args.multipliers:
                row = load_run(args, cluster, mode, k, calibration.capacity_rps)
                rows.append(row)
                print(f"  {mode} {k:g}x done: {row.completed} completed, {row.rejected} rejected, "
                      f"TTFT p99 {fmt(row.ttft_p99_ms)} ms; load average {os.getloadavg()}", flush=True)
        finally:
            cluster.stop()
    print(f"\nfinished {datetime.now(timezone.utc).isoformat(timespec='seconds')}; load average {os.getloadavg()}\n")
    print_table(rows)
    print_ratios(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"started": started, "args": vars(args), "calibration": asdict(calibration) if calibration else None,
                       "admission_limits": limits, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0


def admission_limits(args: argparse.Namespace, cal: Calibration) -> list[str]:
    inflight = max(2, math.ceil(args.headroom * cal.capacity_rps * cal.mean_e2e_s))
    out = ["--max-inflight-requests", str(inflight)]
    if args.slo_factor > 0:
        out += ["--ttft-slo-ms", f"{args.slo_factor * cal.ttft_p50_ms:.0f}"]
    return out


if __name__ == "__main__":
    sys.exit(main())
