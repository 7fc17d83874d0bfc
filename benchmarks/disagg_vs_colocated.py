#!/usr/bin/env python3
"""Goodput under a TPOT SLO: pdserve disaggregated (1 prefill + 1 decode) vs colocated (2 workers).

Both deployments run on the same machine and see the same workloads: a Mooncake trace replay
(loadtest's `mooncake` dataset, lengths x 1/32, arrivals rescaled to each rate) and `random`
prompts. Each workload is swept over request rates through `pdserve.loadtest.run_benchmark`.
Every rate uses its own seed, the same for both deployments, so both get identical requests
and the prefix cache never holds a previous rate's prompts.

Calibration (colocated, before any sweep, per workload):
  1. saturation: `--calib-prompts` requests all at once -> completed req/s = capacity C;
     the sweep's rates are `--rate-fractions` x C (unless `--rates` is given);
  2. a run at `--slo-fraction` x C -> the TPOT SLO is colocated's median TPOT there, so about half
     of colocated's requests miss it at that load. The TTFT bound of the second goodput figure
     is `--ttft-slo-factor` x colocated's median TTFT in the same run.
Goodput counts requests meeting the TPOT SLO (the headline), and also TPOT and TTFT together.

Both clusters stay up; each rate runs the two back to back (alternating which goes first), so both
see the same outside load; per-process CPU seconds are sampled from /proc for every run.
Prints tables and ratios; saves PNGs to docs/img/ and rewrites the
`## Goodput: disaggregated vs colocated` section of docs/benchmarks.md (unless --no-doc).

    python benchmarks/disagg_vs_colocated.py                 # ~10 min on 2 cores
    python benchmarks/disagg_vs_colocated.py --run-s 40 --rate-fractions 0.25 0.5 0.75 1 1.25
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

from bench_docs import replace_section  # noqa: E402
from pdserve.cluster import Cluster, ClusterSpec, start_cluster  # noqa: E402
from pdserve.engine.builtin_model import ensure_builtin_model  # noqa: E402
from pdserve.loadtest import BenchConfig, run_benchmark  # noqa: E402
from pdserve.loadtest.metrics import SLO, latency_values  # noqa: E402

SECTION = "## Goodput: disaggregated vs colocated"
ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENTS = ("colocated", "disagg")
WORKLOADS = ("mooncake", "random")
CLK_TCK = os.sysconf("SC_CLK_TCK")
ANALYSIS = "### What limits it"  # hand-written subsection, kept when the section is rewritten


# ---- deployments ------------------------------------------------------------------------------
def cluster_spec(name: str, model: str, worker_args: list[str], router_args: list[str],
                 log_level: str = "warning") -> ClusterSpec:
    disagg = name == "disagg"
    return ClusterSpec(model=model, num_prefill=1 if disagg else 0, num_decode=1 if disagg else 0,
                       num_colocated=0 if disagg else 2, router_args=router_args, worker_args=worker_args,
                       log_level=log_level)


def planner_log_lines(cluster: Cluster, offset: int) -> tuple[list[str], int]:
    """The planner's logged decisions in the router's log since byte `offset` (and the new offset): its
    deployment runs at log level info, where every decision that is not a repeated hold is logged."""
    try:
        with open(cluster.log_dir / "router.log", "rb") as f:
            f.seek(offset)
            text = f.read()
    except OSError:
        return [], offset
    lines = [ln for ln in text.decode(errors="replace").splitlines() if " planner " in ln or "is now" in ln]
    return lines, offset + len(text)


def cpu_seconds(cluster: Cluster) -> dict[str, float]:
    """utime + stime of every cluster process and of this (load-generating) process, in seconds."""
    out = {"bench-client": sum(os.times()[:2])}
    for proc in cluster.procs:
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[proc.name] = (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError):
            pass
    return out


# ---- runs -------------------------------------------------------------------------------------
def base_config(workload: str, cluster: Cluster, args: argparse.Namespace) -> BenchConfig:
    common = dict(base_url=f"grpc://{cluster.router_address}", backend="pdserve-grpc", progress=False,
                  request_timeout_s=args.run_s * 4, seed=args.seed)
    if workload == "mooncake":
        return BenchConfig(dataset="mooncake", max_output_len=args.max_output_len, **common)
    return BenchConfig(dataset="random", random_input_len=args.random_input_len,
                       random_output_len=args.random_output_len, random_range_ratio=0.5, **common)


async def run_at(cluster: Cluster, config: BenchConfig, rate: float, seed: int, run_s: float,
                 slo_tpot_ms: float | None = None, slo_ttft_ms: float | None = None, num_prompts: int | None = None):
    """One bounded run: about `run_s` seconds of arrivals at `rate`, drained for at most as long again."""
    n = num_prompts or max(4, math.ceil(rate * run_s))
    cfg = dataclasses.replace(config, request_rate=rate, num_prompts=n, max_duration_s=2 * run_s + 5, seed=seed,
                              slo_tpot_ms=slo_tpot_ms, slo_ttft_ms=slo_ttft_ms)
    cpu0, t0 = cpu_seconds(cluster), time.monotonic()
    result = await run_benchmark(cfg)
    cpu1, wall = cpu_seconds(cluster), time.monotonic() - t0
    cpu = {k: (cpu1[k] - cpu0[k]) / wall for k in cpu1 if k in cpu0}  # cores used, averaged over the run
    return result, cpu


def goodput(result, slo: SLO) -> float:
    """Requests/s meeting `slo` (the harness's SLO check, over the run's duration)."""
    s = result.summary
    return sum(1 for r in result.results if slo.is_met_by(r)) / s.duration_s if s.duration_s > 0 else 0.0


def median_ms(values_s: list[float]) -> float:
    return 1e3 * statistics.median(values_s) if values_s else math.nan


def pct(result, metric: str, p: str = "p50") -> float:
    stats = result.summary.latency.get(metric)
    return stats.percentiles_ms[p] if stats else math.nan


# ---- report -----------------------------------------------------------------------------------
def run_row(deployment: str, workload: str, rate: float, result, cpu: dict[str, float], slo_tpot: SLO,
            slo_both: SLO) -> dict:
    s = result.summary
    return {
        "deployment": deployment, "workload": workload, "rate": rate, "sent": s.num_sent, "ok": s.num_completed,
        "failed": s.num_failed + s.num_cancelled + s.num_not_sent, "req_s": s.request_throughput,
        "goodput_tpot": goodput(result, slo_tpot), "goodput_both": goodput(result, slo_both),
        "ttft_p50": pct(result, "ttft"), "ttft_p99": pct(result, "ttft", "p99"),
        "tpot_p50": pct(result, "tpot"), "tpot_p90": pct(result, "tpot", "p90"), "tpot_p99": pct(result, "tpot", "p99"),
        # first gap (first -> second token; for disagg it holds the KV transfer tail and decode admission)
        # vs the later gaps: which part of TPOT the handoff accounts for
        "gap1_p50": median_ms([r.itl_s[0] for r in result.results if r.success and r.itl_s]),
        "gaps_p50": median_ms([g for r in result.results if r.success for g in r.itl_s[1:]]),
        "cpu": {k: round(v, 2) for k, v in cpu.items()}, "errors": s.errors,
        "tpot_ms": [v * 1000 for v in latency_values(result.results)["tpot"]],
        # per request, by start: seconds after the first start, TTFT ms, prompt tokens, prefilled remotely, and
        # the server's phases (ms): where each TTFT went, across a planner's switch
        "requests": [[round(r.start_time - t0, 3), round(1e3 * r.ttft_s, 1) if r.ttft_s is not None else None,
                      r.prompt_len, r.prefilled_remotely,
                      {k: round(1e3 * v, 1) for k, v in (r.phase_s or {}).items()}]
                     for t0 in [min((x.start_time for x in result.results), default=0.0)]
                     for r in sorted(result.results, key=lambda x: x.start_time)],
    }


def format_table(rows: list[dict], workload: str) -> str:
    header = ["rate", "deploy", "sent", "ok", "lost", "req/s", "goodput TPOT", "goodput TPOT+TTFT", "TTFT p50",
              "TTFT p99", "TPOT p50", "TPOT p90", "TPOT p99", "gap1 p50", "gaps p50", "CPU cores (workers; router; client; idle)"]
    out = [header]
    for r in sorted((r for r in rows if r["workload"] == workload), key=lambda r: (r["rate"], r["deployment"])):
        workers = " ".join(f"{k.split('-')[0][:5]}{v:.2f}" for k, v in r["cpu"].items()
                           if k not in ("router", "bench-client", "idle"))
        deploy = f"{r['deployment']} ({r['split']})" if r["deployment"].startswith("planner") else r["deployment"]
        out.append([f"{r['rate']:.2f}", deploy, str(r["sent"]), str(r["ok"]), str(r["failed"]),
                    f"{r['req_s']:.2f}", f"{r['goodput_tpot']:.2f}", f"{r['goodput_both']:.2f}",
                    f"{r['ttft_p50']:.0f}", f"{r['ttft_p99']:.0f}", f"{r['tpot_p50']:.1f}", f"{r['tpot_p90']:.1f}",
                    f"{r['tpot_p99']:.1f}", f"{r['gap1_p50']:.1f}", f"{r['gaps_p50']:.1f}",
                    f"{workers}; {r['cpu'].get('router', 0):.2f}; {r['cpu'].get('bench-client', 0):.2f}; "
                    f"{r['cpu'].get('idle', 0):.2f}"])
    widths = [max(len(row[i]) for row in out) for i in range(len(header))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |" for row in out]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines)


def ratios(rows: list[dict], workload: str, key: str, versus: str = "disagg"
           ) -> tuple[float, float, list[tuple[float, float]]]:
    """(peak goodput `versus` / peak colocated, peak colocated, per-rate ratios)."""
    deployments = ("colocated", versus)
    by = {d: {r["rate"]: r[key] for r in rows if r["workload"] == workload and r["deployment"] == d}
          for d in deployments}
    peak = {d: max(by[d].values(), default=0.0) for d in deployments}
    per_rate = [(rate, by[versus][rate] / by["colocated"][rate] if by["colocated"][rate] else math.nan)
                for rate in sorted(by["colocated"]) if rate in by[versus]]
    return (peak[versus] / peak["colocated"] if peak["colocated"] else math.inf), peak["colocated"], per_rate


def fmt_ratios(per_rate: list[tuple[float, float]]) -> str:
    return ", ".join(f"{rate:.2f}/s " + ("n/a (colocated 0)" if math.isnan(x) else f"{x:.2f}x") for rate, x in per_rate)


def plot(rows: list[dict], slos: dict[str, dict], img_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    colors = {"colocated": "tab:orange", "disagg": "tab:blue", "planner": "tab:green", "planner-colocated": "tab:olive"}
    fig, axes = plt.subplots(1, len(WORKLOADS), figsize=(6 * len(WORKLOADS), 4.2))
    for ax, workload in zip(axes, WORKLOADS):
        for d in [d for d in colors if any(r["deployment"] == d for r in rows)]:
            pts = sorted((r["rate"], r["goodput_tpot"], r["goodput_both"]) for r in rows
                         if r["workload"] == workload and r["deployment"] == d)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[d], label=f"{d}: TPOT SLO")
                ax.plot([p[0] for p in pts], [p[2] for p in pts], "x--", color=colors[d], alpha=0.6,
                        label=f"{d}: TPOT + TTFT SLO")
        top = max((r["rate"] for r in rows if r["workload"] == workload), default=1.0)
        ax.plot([0, top], [0, top], ":", color="grey", label="offered rate")
        slo = slos.get(workload, {})
        ax.set_title(f"{workload}: TPOT <= {slo.get('tpot_ms', 0):.0f} ms, TTFT <= {slo.get('ttft_ms', 0):.0f} ms")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("goodput (req/s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [img_dir / "disagg_vs_colocated_goodput.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(WORKLOADS), figsize=(6 * len(WORKLOADS), 4.2))
    for ax, workload in zip(axes, WORKLOADS):
        w_rates = sorted({r["rate"] for r in rows if r["workload"] == workload})
        for r in rows:
            if r["workload"] != workload or not r["tpot_ms"]:
                continue
            ms = sorted(r["tpot_ms"])
            shade = 0.35 + 0.65 * (w_rates.index(r["rate"]) + 1) / len(w_rates)
            ax.plot(ms, [(i + 1) / len(ms) for i in range(len(ms))], drawstyle="steps-post", color=colors[r["deployment"]],
                    alpha=shade, label=f"{r['deployment']} @ {r['rate']:.2f}/s")
        if workload in slos:
            ax.axvline(slos[workload]["tpot_ms"], color="red", linestyle="--", label="TPOT SLO")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{workload}: TPOT CDF (darker = higher rate)")
        ax.set_xlabel("TPOT (ms, log)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    paths.append(img_dir / "disagg_vs_colocated_tpot_cdf.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


async def split_of_cluster(cluster: Cluster) -> str:
    """The cluster's workers by role, as the router sees them now ("1P:1D", "2 colocated")."""
    from pdserve.client import Client
    from pdserve.planner.planner import split_of

    async with Client(cluster.router_address) as client:
        return str(split_of(w.role for w in await client.workers() if w.healthy))


# ---- main -------------------------------------------------------------------------------------
async def calibrate(cluster: Cluster, workload: str, args: argparse.Namespace, log: list[str]) -> dict:
    config = base_config(workload, cluster, args)
    # 1e4 req/s: everything at once (a finite rate also rescales the trace's own gaps away)
    sat, sat_cpu = await run_at(cluster, config, 1e4, args.seed + 1000, args.run_s,
                                num_prompts=args.calib_prompts)
    capacity = sat.summary.request_throughput
    rates = args.rates or [round(f * capacity, 2) for f in args.rate_fractions]
    mid_rate = round(args.slo_fraction * capacity, 2)
    mid, mid_cpu = await run_at(cluster, config, mid_rate, args.seed + 1001, args.run_s)
    tpot_ms = args.slo_tpot_ms or round(pct(mid, "tpot"), 1)
    ttft_ms = args.slo_ttft_ms or round(args.ttft_slo_factor * pct(mid, "ttft"), -1)
    line = (f"{workload}: colocated saturation {sat.summary.num_completed} requests at once -> {capacity:.2f} req/s "
            f"(TPOT p50 {pct(sat, 'tpot'):.1f} ms, cores {({k: round(v, 2) for k, v in sat_cpu.items()})}); at {mid_rate}/s TPOT p50 {pct(mid, 'tpot'):.1f} ms, "
            f"p90 {pct(mid, 'tpot', 'p90'):.1f} ms, TTFT p50 {pct(mid, 'ttft'):.0f} ms -> SLO TPOT <= {tpot_ms} ms, "
            f"TTFT <= {ttft_ms} ms; rates {rates}")
    print(line)
    log.append(line)
    return {"capacity": capacity, "rates": rates, "tpot_ms": tpot_ms, "ttft_ms": ttft_ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--run-s", type=float, default=12.0, help="seconds of arrivals per run (drain: as long again)")
    ap.add_argument("--rate-fractions", type=float, nargs="+", default=[0.25, 0.4, 0.55, 0.7, 0.9],
                    help="sweep rates as fractions of colocated's measured saturation throughput")
    ap.add_argument("--rates", type=float, nargs="+", help="explicit sweep rates (req/s) for every workload")
    ap.add_argument("--calib-prompts", type=int, default=40, help="requests of the saturation calibration run")
    ap.add_argument("--slo-fraction", type=float, default=0.5,
                    help="calibration load (fraction of saturation) whose colocated median TPOT becomes the SLO")
    ap.add_argument("--slo-tpot-ms", type=float, help="fixed TPOT SLO instead of the calibrated one")
    ap.add_argument("--slo-ttft-ms", type=float, help="fixed TTFT SLO instead of the calibrated one")
    ap.add_argument("--ttft-slo-factor", type=float, default=5.0,
                    help="TTFT SLO = this x colocated's median TTFT in the calibration run")
    ap.add_argument("--random-input-len", type=int, default=256)
    ap.add_argument("--random-output-len", type=int, default=64)
    ap.add_argument("--max-output-len", type=int, default=64, help="cap on mooncake outputs (scaled tokens)")
    ap.add_argument("--model-size", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--worker-args", default="", help="extra flags for every worker")
    ap.add_argument("--router-args", default="", help="extra router flags")
    ap.add_argument("--planner", default="off", choices=["off", "throughput", "slo"],
                    help="also run a third deployment: 1 prefill + 1 decode with the router's planner in this mode, "
                         "its targets the workload's SLO (started per workload, after calibration)")
    ap.add_argument("--planner-start", nargs="+", default=["disagg"], choices=["disagg", "colocated"],
                    help="the planner deployment's split when it starts: disagg (1 prefill + 1 decode) and/or "
                         "colocated (2 colocated workers with --role-switching on); both: two planner deployments")
    ap.add_argument("--planner-args", default="--planner-interval-s 1 --planner-window-s 10 --planner-hold-s 5 "
                    "--planner-confirm 2 --planner-min-requests 8", help="extra router flags of the planner deployment")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="write every run's numbers here")
    ap.add_argument("--img-dir", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--no-doc", action="store_true", help="print and plot only")
    args = ap.parse_args()

    load_start = os.getloadavg()
    started = datetime.now(timezone.utc)
    t_start = time.monotonic()
    print(f"load average at start (1/5/15 min): {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}; "
          f"{os.cpu_count()} CPUs")
    model = str(ensure_builtin_model(args.model_size))
    worker_args, router_args = shlex.split(args.worker_args), shlex.split(args.router_args)
    slos: dict[str, dict] = {}
    rows: list[dict] = []
    calib_log: list[str] = []
    clusters: dict[str, Cluster] = {}
    try:
        # Both deployments stay up, so each rate runs them back to back under the same outside load;
        # the idle one costs a few hundredths of a core (its health polls), measured per run as "idle".
        for deployment in DEPLOYMENTS:
            clusters[deployment] = start_cluster(cluster_spec(deployment, model, worker_args, router_args), attempts=3)
            asyncio.run(run_at(clusters[deployment], base_config("random", clusters[deployment], args), math.inf,
                               args.seed + 999, 2, num_prompts=4))  # warm-up
        for workload in args.workloads:  # colocated calibrates the SLO and the rates before any sweep
            slos[workload] = asyncio.run(calibrate(clusters["colocated"], workload, args, calib_log))
        for workload in args.workloads:
            slo = slos[workload]
            slo_tpot, slo_both = SLO(tpot_ms=slo["tpot_ms"]), SLO(ttft_ms=slo["ttft_ms"], tpot_ms=slo["tpot_ms"])
            deployments = DEPLOYMENTS
            if args.planner != "off":  # its targets are this workload's SLO, so it starts now
                planner_args = ["--planner", args.planner, "--planner-tpot-slo-ms", str(slo["tpot_ms"]),
                                "--planner-ttft-slo-ms", str(slo["ttft_ms"]), *shlex.split(args.planner_args)]
                for start in args.planner_start:
                    # "disagg": 1 prefill + 1 decode (prefill and decode workers switch roles by default);
                    # "colocated": 2 colocated workers, role switching turned on (off by default for them)
                    name = "planner" if start == "disagg" else "planner-colocated"
                    extra = [] if start == "disagg" else ["--role-switching", "on"]
                    spec = cluster_spec(start, model, worker_args + extra, router_args + planner_args, log_level="info")
                    clusters[name] = start_cluster(spec, attempts=3)
                    asyncio.run(run_at(clusters[name], base_config("random", clusters[name], args), math.inf,
                                       args.seed + 999, 2, num_prompts=4))  # warm-up
                    deployments = (*deployments, name)
            for i, rate in enumerate(slo["rates"]):
                k = i % len(deployments)
                for deployment in deployments[k:] + deployments[:k]:  # rotate who goes first
                    cluster = clusters[deployment]
                    log_offset = planner_log_lines(cluster, 0)[1] if deployment.startswith("planner") else 0
                    idle = [c for d, c in clusters.items() if d != deployment]
                    idle0 = sum(sum(cpu_seconds(c).values()) - sum(os.times()[:2]) for c in idle)
                    result, cpu = asyncio.run(run_at(cluster, base_config(workload, cluster, args), rate, args.seed + i,
                                                     args.run_s, slo_tpot_ms=slo["tpot_ms"], slo_ttft_ms=slo["ttft_ms"]))
                    idle1 = sum(sum(cpu_seconds(c).values()) - sum(os.times()[:2]) for c in idle)
                    cpu["idle"] = (idle1 - idle0) / result.summary.duration_s if result.summary.duration_s else 0.0
                    row = run_row(deployment, workload, rate, result, cpu, slo_tpot, slo_both)
                    row["split"] = asyncio.run(split_of_cluster(cluster))
                    if deployment.startswith("planner"):
                        row["planner_log"] = planner_log_lines(cluster, log_offset)[0]
                        print("\n".join("    " + ln for ln in row["planner_log"]), flush=True)
                    rows.append(row)
                    print(f"{deployment:9s} {workload:8s} rate {rate:6.2f}: ok {row['ok']}/{row['sent']}, goodput "
                          f"{row['goodput_tpot']:.2f} (TPOT) {row['goodput_both']:.2f} (+TTFT), TPOT p50 "
                          f"{row['tpot_p50']:.1f} ms, TTFT p50 {row['ttft_p50']:.0f} ms, cores {row['cpu']}, "
                          f"split after {row['split']}, load {os.getloadavg()[0]:.1f}", flush=True)
            for name in [n for n in clusters if n.startswith("planner")]:
                clusters.pop(name).stop()
    finally:
        for cluster in clusters.values():
            cluster.stop()
    load_end = os.getloadavg()
    elapsed_min = (time.monotonic() - t_start) / 60

    tables, summary_lines = {}, []
    for workload in args.workloads:
        tables[workload] = format_table(rows, workload)
        peak_ratio, _, per_rate = ratios(rows, workload, "goodput_tpot")
        peak_both, _, per_rate_both = ratios(rows, workload, "goodput_both")
        line = (f"{workload}: peak goodput disagg/colocated = {peak_ratio:.2f}x at TPOT <= {slos[workload]['tpot_ms']} ms "
                f"(per rate: {fmt_ratios(per_rate)}); with TTFT <= "
                f"{slos[workload]['ttft_ms']} ms too: {peak_both:.2f}x (per rate: "
                f"{fmt_ratios(per_rate_both)})")
        summary_lines.append(line)
        for name in [n for n in ("planner", "planner-colocated") if any(r["deployment"] == n for r in rows)]:
            p_ratio, _, p_rates = ratios(rows, workload, "goodput_tpot", versus=name)
            p_both, _, p_rates_both = ratios(rows, workload, "goodput_both", versus=name)
            ttft = {d: [r["ttft_p50"] for r in rows if r["workload"] == workload and r["deployment"] == d]
                    for d in ("colocated", name)}
            summary_lines.append(f"{workload}: peak goodput {name} ({args.planner})/colocated = {p_ratio:.2f}x at TPOT "
                                 f"(per rate: {fmt_ratios(p_rates)}); with TTFT too: {p_both:.2f}x (per rate: "
                                 f"{fmt_ratios(p_rates_both)}); TTFT p50 {name}/colocated per rate: "
                                 + ", ".join(f"{a / b:.2f}x" for a, b in zip(ttft[name], ttft["colocated"]) if b)
                                 + "; splits after each rate: "
                                 + ", ".join(r["split"] for r in rows if r["workload"] == workload
                                             and r["deployment"] == name))
        print(f"\n{workload} (latencies in ms; CPU = cores used per process, averaged over the run)")
        print(tables[workload])
    print()
    for line in summary_lines:
        print(line)
    print(f"load average at end (1/5/15 min): {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}; "
          f"{elapsed_min:.1f} min")
    paths = plot(rows, slos, Path(args.img_dir))
    print("plots:", ", ".join(str(p) for p in paths))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "slos": slos, "rows": rows}, indent=1))
    if args.no_doc:
        return

    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    doc = Path(args.doc)
    rel = [os.path.relpath(p, doc.parent) for p in paths]
    body = f"""
`benchmarks/disagg_vs_colocated.py` measures goodput (requests/s that meet the SLO) for
pdserve disaggregated (1 prefill + 1 decode worker) and pdserve colocated (2 workers, each
doing prefill and decode). Both deployments run on the same 2 cores and see the same
workloads:

- `mooncake`: replay of the shared conversation trace with loadtest's default scaling. Lengths
  are multiplied by 1/32, so a 512-token block becomes 16 tokens, and outputs are capped at
  {args.max_output_len}. Trace gaps are rescaled to each rate.
- `random`: input {args.random_input_len} ± 50 %, output {args.random_output_len} ± 50 % tokens, Poisson arrivals.

Each rate uses its own seed, the same for both deployments, so both get identical requests and
the prefix cache (on, the default) never holds a previous rate's prompts. Both clusters stay up
for the whole run, and each rate runs the two deployments back to back, alternating which goes
first. That way both see the same outside load on this shared machine. The idle cluster's CPU
(health polls) is measured per run; see the "idle" figure in the CPU column. Colocated
calibrates before any sweep.
Every run: {args.run_s:g} s of arrivals, drained for at most {args.run_s:g} s + 5 s more.
Requests cut off at that limit count as not good.

- Command: `{command}` ({elapsed_min:.1f} min)
- Date: {started.strftime('%Y-%m-%d %H:%M UTC')}; machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), \
Python {platform.python_version()}; model: built-in `{args.model_size}`, float32, 1 torch thread per worker
- Load average (1/5/15 min): start {load_start[0]:.2f} / {load_start[1]:.2f} / {load_start[2]:.2f}, \
end {load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f}. Anything else on the 2 cores \
makes the absolute numbers noisy; both deployments ran back to back at each rate.

**How the SLO was chosen** (calibration on colocated, per workload, before any sweep):
1. {args.calib_prompts} requests sent at once (rate 10^4/s); colocated's completed req/s is its capacity C.
   The sweep's rates are {args.rate_fractions} x C{' (overridden by --rates)' if args.rates else ''}.
2. One run at {args.slo_fraction} x C. The **TPOT SLO is colocated's median TPOT in that run**, so
   at half its capacity about half of colocated's requests already miss it: a bound that
   colocated struggles to hold. The secondary TTFT bound is {args.ttft_slo_factor:g} x
   colocated's median TTFT in the same run.

{chr(10).join('    ' + line for line in calib_log)}

Headline goodput counts requests that meet the TPOT SLO. "TPOT+TTFT" also requires the TTFT
bound, which matters because disaggregation's single prefill worker can queue prompts.
The CPU column shows cores used by each process (`/proc` utime+stime ÷ wall time): workers
first, then the router, the load-generating client (this process) and the whole idle cluster. `gap1` is the
median gap between a request's first and second token. For disaggregated requests, it includes
the KV transfer tail and decode admission, because prefill returns the first token before its KV
has landed. `gaps` is the median of the later inter-token gaps, which is pure decode.

{chr(10).join(f'### {w}{chr(10)}{chr(10)}{tables[w]}{chr(10)}' for w in args.workloads)}
**Ratios:**

{chr(10).join('- ' + line for line in summary_lines)}

![goodput vs rate]({rel[0]})
![TPOT CDFs]({rel[1]})
"""
    replace_section(doc, SECTION, body, keep=ANALYSIS)
    print(f"wrote section {SECTION!r} of {doc}")


if __name__ == "__main__":
    main()
