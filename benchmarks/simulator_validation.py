#!/usr/bin/env python3
"""Does `pdserve simulate` predict real runs? Calibrates the engine on this machine (planner/calibrate.py:
its step times, and the serving stack's cost around a decode step and per streamed token, from one real
colocated worker), then for each configuration (2 workers: 1P:1D and 2 colocated; 4 workers: 2P:2D and
4 colocated) starts the real cluster, runs the bench's random dataset at a fixed rate, and simulates the
very same requests and arrivals (same BenchConfig, same seed) with the calibration and the machine's cores
shared by the workers, the router and the client (what other processes used during each run is measured
from /proc and printed, to judge the run by). Prints measured vs simulated goodput, TTFT p50 and TPOT p50
and their ratios; --json writes them.

    python benchmarks/simulator_validation.py --json /tmp/simval.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import time
from datetime import datetime, timezone

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

from pdserve.cluster import ClusterSpec, start_cluster  # noqa: E402
from pdserve.engine.builtin_model import ensure_builtin_model  # noqa: E402
from pdserve.engine.config import EngineConfig  # noqa: E402
from pdserve.loadtest import BenchConfig, run_benchmark  # noqa: E402
from pdserve.planner.calibrate import (calibrate, calibrate_serving, contention_probe, fit_step_factors,  # noqa: E402
                                       step_summary)
from pdserve.planner.model import Split  # noqa: E402
from pdserve.planner.simulate_cmd import sim_requests  # noqa: E402
from pdserve.planner.simulator import Simulation  # noqa: E402
from pdserve.router.config import RouterConfig  # noqa: E402
from pdserve.engine.threads import available_cpus  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def busy_cpu_s() -> float:
    """CPU seconds every process on the machine has used (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


def own_cpu_s(cluster) -> float:
    """CPU seconds of this run's processes: the cluster's and this (load-generating) one."""
    total = sum(os.times()[:2])
    for proc in cluster.procs:
        try:
            fields = open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError):
            pass
    return total


def worker_counters(cluster) -> list:
    """Every worker's step counters (engine/step_times.py) as it reports them now."""
    from pdserve.client import Client
    from pdserve.engine.step_times import StepTimes

    async def get():
        async with Client(cluster.router_address) as client:
            return [StepTimes.from_stats(w.stats) for w in await client.workers(refresh=True)]
    return asyncio.run(get())


def diff(after, before):
    from pdserve.engine.step_times import StepTimes

    return StepTimes(**{k: getattr(after, k) - getattr(before, k) for k in StepTimes.fields()})


CONFIGS = {"1P:1D": Split(1, 1), "2 colocated": Split(0, 0, 2), "2P:2D": Split(2, 2), "4 colocated": Split(0, 0, 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="1P:1D,2 colocated,2P:2D,4 colocated")
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--num-prompts", type=int, default=60)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--slo-tpot-ms", type=float, default=30.0)
    ap.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", default="")
    ap.add_argument("--config-calibrations", type=int, default=2,
                    help="per configuration, this many calibration runs (other seeds; the first before the measured "
                         "run, the rest after) whose workers' step counters fit the simulated served step "
                         "(planner/calibrate.py fit_step_factors); each is simulated against the measured run")
    ap.add_argument("--no-serving-calibration", action="store_true",
                    help="engine step times only (no serving-stack overheads), as before")
    ap.add_argument("--no-step-factor", action="store_true",
                    help="keep the engine's own step times (no serving_step_factor from the serving calibration)")
    ap.add_argument("--probe-outside-load", action="store_true",
                    help="before each configuration, estimate other processes' runnable threads with the "
                         "contention probe (planner/calibrate.py; noisy, and it also counts the two vCPUs slowing "
                         "each other as outside load: docs/simulator.md)")
    args = ap.parse_args()
    model = str(ensure_builtin_model("tiny"))
    cores = available_cpus()
    load0 = os.getloadavg()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cal, _ = calibrate(EngineConfig(model=model, num_threads=1))
    if not args.no_serving_calibration:
        serving, samples = calibrate_serving(model, num_threads=1, step=None if args.no_step_factor else cal.step)
        cal = dataclasses.replace(cal, **serving)
        print(f"serving calibration: {serving} from {samples}")
    print(f"calibration: {cal.step}")
    rows = []
    for name in [c.strip() for c in args.configs.split(",")]:
        split = CONFIGS[name]
        spec = ClusterSpec(model=model, num_prefill=split.num_prefill, num_decode=split.num_decode,
                           num_colocated=split.num_colocated, log_level="warning")
        cluster = start_cluster(spec)

        def bench_config(seed: int) -> BenchConfig:
            return BenchConfig(base_url=f"grpc://{cluster.router_address}", backend="pdserve-grpc", progress=False,
                               dataset="random", random_input_len=args.input_len, random_output_len=args.output_len,
                               random_range_ratio=0.5, request_rate=args.rate, num_prompts=args.num_prompts,
                               seed=seed, slo_tpot_ms=args.slo_tpot_ms, slo_ttft_ms=args.slo_ttft_ms,
                               max_duration_s=120, tokenizer=model)

        def counted_run(config: BenchConfig):
            """(the bench summary, the workers' step summary over the run, wall s, cores others used)"""
            counters0 = worker_counters(cluster)
            t0, busy0, own0 = time.monotonic(), busy_cpu_s(), own_cpu_s(cluster)
            summary = asyncio.run(run_benchmark(config)).summary
            wall = time.monotonic() - t0
            outside = max(0.0, (busy_cpu_s() - busy0) - (own_cpu_s(cluster) - own0)) / wall
            # the workers' own step times over the run (as they report them: what the router learns from)
            deltas = [diff(a, b) for a, b in zip(worker_counters(cluster), counters0)]
            return summary, step_summary(deltas), wall, outside, deltas

        # calibration runs of this configuration (other seeds: other requests, same rate and lengths), one
        # before and one after the measured run: the served step under its own concurrency, and its spread
        calib_seeds = [args.seed + 1000 + j for j in range(args.config_calibrations)]
        calib_runs = []
        try:
            bench = bench_config(args.seed)
            probe = {"outside_runnable": 0.0} if not args.probe_outside_load else contention_probe(
                EngineConfig(model=model, num_threads=max(1, cores // split.num_workers)), split.num_workers)
            if calib_seeds:
                calib_runs.append((calib_seeds[0], counted_run(bench_config(calib_seeds[0]))))
            measured, measured_steps, wall, outside, _ = counted_run(bench)
            for seed in calib_seeds[1:]:
                calib_runs.append((seed, counted_run(bench_config(seed))))
        finally:
            cluster.stop()
        threads = max(1, cores // split.num_workers)
        num_cores = cores / threads
        sim_kwargs = dict(slo_ttft_s=args.slo_ttft_ms / 1e3, slo_tpot_s=args.slo_tpot_ms / 1e3, num_cores=num_cores,
                          outside_runnable=probe["outside_runnable"])
        reqs = sim_requests(dataclasses.replace(bench), cal.block_size)

        def simulate(c):
            simulation = Simulation(reqs, split, c, RouterConfig(), **sim_kwargs)
            return simulation.run(), step_summary([w.step_times for w in simulation.workers])

        sim, sim_steps = simulate(cal)
        m_ttft = measured.latency["ttft"].percentiles_ms["p50"]
        m_tpot = measured.latency["tpot"].percentiles_ms["p50"]

        def ratios(result, steps) -> dict:
            out = {"sim_goodput": result.goodput_rps, "sim_ttft_p50_ms": 1e3 * result.ttft_s["p50"],
                   "sim_tpot_p50_ms": 1e3 * result.tpot_s["p50"], "sim_steps": steps}
            out["goodput_ratio"] = out["sim_goodput"] / measured.goodput if measured.goodput else None
            out["ttft_ratio"] = out["sim_ttft_p50_ms"] / m_ttft if m_ttft else None
            out["tpot_ratio"] = out["sim_tpot_p50_ms"] / m_tpot if m_tpot else None
            return out

        row = {"config": name, "measured_goodput": measured.goodput, "measured_ttft_p50_ms": m_ttft,
               "measured_tpot_p50_ms": m_tpot, "completed": measured.num_completed, "wall_s": wall,
               "outside_cores": outside, "probe": probe, "measured_steps": measured_steps, **ratios(sim, sim_steps),
               "per_config": []}
        fits = [([seed], [run]) for seed, run in calib_runs]
        if len(calib_runs) > 1:  # the headline: every calibration run pooled (their counters summed)
            fits.insert(0, ([seed for seed, _ in calib_runs], [run for _, run in calib_runs]))
        for seeds, c_runs in fits:
            c_steps = step_summary([d for _, _, _, _, deltas in c_runs for d in deltas])
            c_reqs = [sim_requests(bench_config(seed), cal.block_size) for seed in seeds]
            fitted, history = fit_step_factors(c_reqs, split, cal, RouterConfig(), c_steps, **sim_kwargs)
            f_sim, f_steps = simulate(fitted)
            row["per_config"].append({
                "seeds": seeds, "calib_steps": c_steps, "calib_outside_cores": [r[3] for r in c_runs],
                "calib_ttft_p50_ms": [r[0].latency["ttft"].percentiles_ms["p50"] for r in c_runs],
                "serving_step_factor": fitted.serving_step_factor,
                "serving_prefill_factor": fitted.serving_prefill_factor, "fit_history": history,
                **ratios(f_sim, f_steps)})
        rows.append(row)
        print(json.dumps(row))
    load1 = os.getloadavg()
    print(f"\nrandom {args.input_len}/{args.output_len} +-50% at {args.rate}/s, {args.num_prompts} prompts, SLO TPOT "
          f"{args.slo_tpot_ms} ms TTFT {args.slo_ttft_ms} ms; {started}; load {load0} -> {load1}")
    print("| config | probe: others' runnable | cores others used | goodput measured | simulated | sim/meas | "
          "TTFT p50 measured | simulated | sim/meas | TPOT p50 measured | simulated | sim/meas |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['probe']['outside_runnable']:.2f} | {r['outside_cores']:.2f} | "
              f"{r['measured_goodput']:.2f} | {r['sim_goodput']:.2f} | "
              f"{r['goodput_ratio']:.2f} | {r['measured_ttft_p50_ms']:.0f} | {r['sim_ttft_p50_ms']:.0f} | "
              f"{r['ttft_ratio']:.2f} | {r['measured_tpot_p50_ms']:.1f} | {r['sim_tpot_p50_ms']:.1f} | "
              f"{r['tpot_ratio']:.2f} |")
    print("\nThe workers' own step times (summed over the workers; measured: their WorkerStats step counters over the run):")
    print("| config | decode step measured (ms) | simulated | at batch measured | simulated | prefill-step ms per "
          "prompt token measured | simulated | decodes riding per prefill step measured | simulated |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        m, s_ = r["measured_steps"], r["sim_steps"]
        print(f"| {r['config']} | {m['decode_step_ms']:.2f} | {s_['decode_step_ms']:.2f} | {m['decode_batch']:.1f} | "
              f"{s_['decode_batch']:.1f} | {m['prefill_ms_per_token']:.3f} | {s_['prefill_ms_per_token']:.3f} | "
              f"{m['prefill_step_decodes']:.1f} | {s_['prefill_step_decodes']:.1f} |")
    if any(r["per_config"] for r in rows):
        print("\nWith the served step fitted on each configuration's own calibration runs (fit_step_factors; "
              "the calibration runs pooled, then each alone for the spread: its step factors, then sim/meas on the "
              "measured run):")
        print("| config | calibration | step factor | prefill factor | calib decode step (ms) | calib prefill ms/token "
              "| goodput sim/meas | TTFT p50 sim (ms) | sim/meas | TPOT p50 sim (ms) | sim/meas |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            for f in r["per_config"]:
                when = ("pooled" if len(f["seeds"]) > 1 else "before" if f["seeds"][0] == args.seed + 1000
                        else "after")
                print(f"| {r['config']} | {when} (seeds {','.join(map(str, f['seeds']))}) | {f['serving_step_factor']:.2f} | "
                      f"{f['serving_prefill_factor']:.2f} | {f['calib_steps']['decode_step_ms']:.2f} | "
                      f"{f['calib_steps']['prefill_ms_per_token']:.3f} | {f['goodput_ratio']:.2f} | "
                      f"{f['sim_ttft_p50_ms']:.0f} | {f['ttft_ratio']:.2f} | {f['sim_tpot_p50_ms']:.1f} | "
                      f"{f['tpot_ratio']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "calibration": cal.to_dict(), "rows": rows, "load": [load0, load1],
                       "date": started}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
