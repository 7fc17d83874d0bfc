"""`pdserve simulate`: replay a bench dataset (random, shared-prefix, a Mooncake trace; the same
`pdserve bench` dataset and arrival flags) through the real RoutingPolicy and planner against simulated
workers, for every P:D split of --workers (and with the planner on), in simulated time; prints goodput,
TTFT/TPOT percentiles and prefix-hit ratio per split, writes JSON and plots.

`pdserve simulate --calibrate FILE` measures the engine's step times (planner/calibrate.py) and writes the
calibration the simulation then reads (`--calibration FILE`)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from pdserve.planner.config import PlannerConfig
from pdserve.planner.model import Split, candidate_splits
from pdserve.planner.simulator import Calibration, SimRequest, SimResult, Simulation
from pdserve.router.config import RouterConfig
from pdserve.settings import add_config_arguments, config_from_args

logger = logging.getLogger(__name__)

# the router settings the RoutingPolicy reads (the rest of RouterConfig is the router's front door)
POLICY_FIELDS = ("local_prefill_threshold", "local_prefill_max_inflight", "remote_prefill_max_queue_tokens",
                 "store_load_cost", "prefix_index_blocks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pdserve.engine.config import EngineConfig
    from pdserve.loadtest import cli as bench_cli

    sim = parser.add_argument_group("simulation")
    sim.add_argument("--workers", type=int, default=4, help="simulated workers (10 to 1000 and more are fine)")
    sim.add_argument("--splits", default="all", help="comma-separated splits to run, as P:D or 'colocated' "
                     "(all: every P:D of --workers and all colocated)")
    sim.add_argument("--with-planner", choices=["off", "throughput", "slo"], default="slo",
                     help="also run with the planner in this mode, starting from the middle split (off: no such run)")
    sim.add_argument("--calibration", default="", metavar="FILE",
                     help="worker calibration JSON from --calibrate (empty: the built-in defaults)")
    sim.add_argument("--calibrate", default="", metavar="FILE",
                     help="measure the engine (the --model etc. engine flags) and write the calibration here, then exit")
    sim.add_argument("--speed-factors", default="", help="heterogeneous pools: comma-separated step-time "
                     "factors, cycled over the workers (1: calibrated speed, 2: twice as slow)")
    sim.add_argument("--no-store", action="store_true", help="simulate without a KV cache store")
    sim.add_argument("--num-cores", type=float, default=0.0, help="the workers share this many CPU cores: a step "
                     "slows by (busy workers + the router's and clients' share + --outside-runnable) / cores past 1, "
                     "as on one CPU host; 0: each worker has its own device")
    sim.add_argument("--outside-runnable", type=float, default=0.0, help="with --num-cores: threads of other "
                     "processes wanting those cores too (planner/calibrate.py contention_probe measures it)")
    sim.add_argument("--out-dir", default="", help="write results.json and plots (PNG) here")
    sim.add_argument("--max-sim-s", type=float, default=7200.0, help="stop the simulated clock here")
    bench_cli.add_arguments(parser)
    policy = parser.add_argument_group("router policy (as pdserve router)")
    for name in POLICY_FIELDS:
        f = RouterConfig.__dataclass_fields__[name]
        policy.add_argument(f"--{name.replace('_', '-')}", dest=name, type=type(f.default), default=f.default,
                            help=f.metadata["help"])
    add_config_arguments(parser, PlannerConfig, title="planner (as pdserve router)")
    engine = parser.add_argument_group("engine (for --calibrate)")
    engine.add_argument("--calib-model", default="", help="model directory to calibrate (empty: built-in tiny)")
    engine.add_argument("--calib-num-threads", type=int, default=1, help="torch threads of the calibrated engine")
    engine.add_argument("--calib-serving", action="store_true", help="also start one real colocated worker and "
                        "measure the serving stack's cost around a decode step and the router's and client's CPU "
                        "per token (planner/calibrate.py calibrate_serving)")
    engine.add_argument("--calib-max-num-batched-tokens", type=int,
                        default=EngineConfig.__dataclass_fields__["max_num_batched_tokens"].default)


def parse_splits(text: str, num_workers: int) -> list[Split]:
    if text == "all":
        return candidate_splits(num_workers)
    out = []
    for part in text.split(","):
        part = part.strip()
        if part == "colocated":
            out.append(Split(0, 0, num_workers))
            continue
        p, sep, d = part.partition(":")
        if not sep or not p.isdigit() or not d.isdigit() or int(p) + int(d) < 1:
            raise ValueError(f"split {part!r}: expected P:D (like 1:3) or 'colocated'")
        out.append(Split(int(p), int(d)))
    return out


def sim_requests(bench_config, block_size: int, fingerprint: bytes = b"sim") -> list[SimRequest]:
    """The bench's own requests and arrival offsets for this config (loadtest), with the router's hashes."""
    from pdserve.engine.block_hash import chain_block_hashes
    from pdserve.loadtest.arrivals import arrival_offsets
    from pdserve.loadtest.datasets import build_requests
    from pdserve.loadtest.tokens import TokenCodec

    codec = TokenCodec(bench_config.tokenizer, bench_config.vocab_size)
    reqs = build_requests(bench_config, codec)
    trace = [r.arrival_offset_s or 0.0 for r in reqs] if bench_config.arrival == "trace" else None
    offsets = arrival_offsets(bench_config.arrival, len(reqs), bench_config.request_rate, bench_config.burstiness,
                              bench_config.seed, trace)
    out = []
    for r, t in zip(reqs, offsets):
        ids = r.prompt if isinstance(r.prompt, list) else codec.encode(r.prompt)
        out.append(SimRequest(r.request_id, t, len(ids), r.max_tokens,
                              tuple(chain_block_hashes(ids, block_size, fingerprint))))
    return out


def simulate(requests: list[SimRequest], splits: list[Split], cal: Calibration, router_config: RouterConfig,
             planner_config: PlannerConfig, with_planner: str, slo_ttft_s, slo_tpot_s, use_store: bool = True,
             speed_factors: list[float] | None = None, max_sim_s: float = 7200.0,
             num_cores: float | None = None, outside_runnable: float = 0.0) -> list[SimResult]:
    from dataclasses import replace

    results = []
    off = replace(planner_config, planner="off")
    for split in splits:
        sim = Simulation(requests, split, cal, router_config, off, slo_ttft_s, slo_tpot_s, use_store, speed_factors,
                         num_cores, outside_runnable)
        results.append(sim.run(max_sim_s))
    if with_planner != "off" and splits:
        start = [s for s in splits if not s.num_colocated]
        start_split = start[len(start) // 2] if start else splits[0]
        sim = Simulation(requests, start_split, cal, router_config, replace(planner_config, planner=with_planner),
                         slo_ttft_s, slo_tpot_s, use_store, speed_factors, num_cores, outside_runnable)
        results.append(sim.run(max_sim_s))
    return results


def table(results: list[SimResult]) -> str:
    def ms(d: dict, k: str) -> str:
        v = d.get(k)
        return "-" if v is None else f"{1e3 * v:.0f}"
    rows = ["| split | planner | finished | goodput req/s | req/s | TTFT p50 | TTFT p90 | TPOT p50 | TPOT p90 | "
            "prefix hit | local prefill | KV GB moved | final split |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        rows.append(f"| {r.split} | {r.planner} | {r.num_finished}/{r.num_requests} | {r.goodput_rps:.2f} | "
                    f"{r.throughput_rps:.2f} | {ms(r.ttft_s, 'p50')} | {ms(r.ttft_s, 'p90')} | {ms(r.tpot_s, 'p50')} | "
                    f"{ms(r.tpot_s, 'p90')} | {r.prefix_hit_ratio:.3f} | {r.local_prefill_share:.2f} | "
                    f"{r.kv_bytes_moved / 1e9:.2f} | {r.final_split} |")
    return "\n".join(rows)


def plot(results: list[SimResult], out_dir: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.split + (f"\n(planner {r.planner})" if r.planner != "off" else "") for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    axes[0].bar(labels, [r.goodput_rps for r in results], color="tab:green")
    axes[0].set_title("goodput (req/s meeting the SLO)")
    for ax, key, name in ((axes[1], "ttft_s", "TTFT"), (axes[2], "tpot_s", "TPOT")):
        for p, color in (("p50", "tab:blue"), ("p90", "tab:orange")):
            ax.plot(labels, [1e3 * (getattr(r, key)[p] or math.nan) for r in results], "o-", color=color, label=p)
        ax.set_title(f"{name} (ms)")
        ax.legend()
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = out_dir / "simulate_splits.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def run(args: argparse.Namespace) -> int:
    from pdserve.loadtest import cli as bench_cli

    if args.calibrate:
        from pdserve.engine.config import EngineConfig
        from dataclasses import replace

        from pdserve.planner.calibrate import calibrate, calibrate_serving

        cal, samples = calibrate(EngineConfig(model=args.calib_model, num_threads=args.calib_num_threads,
                                              max_num_batched_tokens=args.calib_max_num_batched_tokens))
        serving_samples = []
        if args.calib_serving:
            from pdserve.engine.builtin_model import ensure_builtin_model

            serving, serving_samples = calibrate_serving(args.calib_model or str(ensure_builtin_model("tiny")),
                                                         args.calib_num_threads, step=cal.step)
            cal = replace(cal, **serving)
            print(f"serving stack: {serving}")
        Path(args.calibrate).write_text(json.dumps({"calibration": cal.to_dict(), "samples": samples,
                                                    "serving_samples": serving_samples}, indent=1))
        print(f"calibration written to {args.calibrate}: {cal.step}")
        for s in samples:
            print(f"  decode {s['decode_seqs']:3d} prefill {s['prefill_tokens']:4d} context {s['context_tokens']:5d}: "
                  f"measured {1e3 * s['step_s']:.2f} ms, fit {1e3 * s['fit_s']:.2f} ms")
        return 0
    cal = Calibration.from_dict(json.loads(Path(args.calibration).read_text())["calibration"]) \
        if args.calibration else Calibration()
    bench = bench_cli.config_from_args(args)
    router_config = RouterConfig(**{name: getattr(args, name) for name in POLICY_FIELDS})
    planner_config = config_from_args(PlannerConfig, args)
    splits = parse_splits(args.splits, args.workers)
    factors = [float(x) for x in args.speed_factors.split(",") if x.strip()] or None
    t0 = time.monotonic()
    try:
        requests = sim_requests(bench, cal.block_size)
    except ValueError as exc:  # a malformed trace line, named
        print(f"pdserve simulate: {exc}", file=sys.stderr)
        return 2
    slo_ttft = bench.slo_ttft_ms / 1e3 if bench.slo_ttft_ms else None
    slo_tpot = bench.slo_tpot_ms / 1e3 if bench.slo_tpot_ms else None
    results = simulate(requests, splits, cal, router_config, planner_config, args.with_planner, slo_ttft, slo_tpot,
                       not args.no_store, factors, args.max_sim_s, args.num_cores or None, args.outside_runnable)
    print(f"{len(requests)} requests ({bench.dataset}), {args.workers} workers, SLO TTFT {bench.slo_ttft_ms} ms "
          f"TPOT {bench.slo_tpot_ms} ms; simulated in {time.monotonic() - t0:.1f} s of wall time")
    print(table(results))
    for r in results:
        if r.planner != "off":
            for d in r.decisions:
                if d[1] != "hold":
                    print(f"  planner t={d[0]:.1f}s {d[1]} {d[2]} -> {d[3]} {d[4][:160]}")
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps([r.to_dict() for r in results], indent=1, default=str))
        for p in plot(results, out, f"{bench.dataset}, {args.workers} workers"):
            print(f"plot: {p}")
    return 0
