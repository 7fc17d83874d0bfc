"""Engine step times while serving: what a worker's steps cost under real load, next to what the client sees.

Starts `pdserve up --colocated` (or the `pdserve up` defaults with `--disagg`), loads it with the same
`pdserve bench` runs as benchmarks/vs_vllm.py (random 256/64, 60 prompts, each rate with its own prompts), and
around each run reads every worker's step counters (WorkerStats: decode steps, their seconds and sequences;
prefill steps, their seconds and prompt tokens) and every worker thread's CPU seconds (/proc/PID/task). Prints,
per run: the client's tok/s, TTFT and TPOT; per worker the mean decode step (ms) at its mean batch, the mean
prefill step, the seconds spent in steps; per thread the cores it kept busy. A served decode step much slower than
an offline one (benchmarks/linear_rows.py --engine-steps) is time the engine thread spent off its core.

    python benchmarks/served_steps.py --model tiny --rates 4 inf
    python benchmarks/served_steps.py --rates 4 --env PDSERVE_STEP_THREADS=false   # an A/B by environment
    python benchmarks/served_steps.py --worker-args "--num-threads 1"
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_path import pids_of  # noqa: E402
from vs_vllm import CLK_TCK, bench, resolve_model, stop_server, wait_up  # noqa: E402

ENGINE_ROLES = ("worker", "prefill", "decode")


def start(model: Path, port: int, log: Path, args: argparse.Namespace) -> subprocess.Popen:
    argv = [sys.executable, "-m", "pdserve", "--log-level", "warning", "up", "--model", str(model),
            "--http-port", str(port), "--port", str(port + 100)]
    if not args.disagg:
        argv.append("--colocated")
    if args.worker_args:
        argv += ["--worker-args", args.worker_args]
    env = {**os.environ, "UCX_WARN_UNUSED_ENV_VARS": "n", **dict(kv.split("=", 1) for kv in args.env)}
    return subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


async def step_counters(router: str) -> dict:
    from pdserve.client import Client
    from pdserve.engine.step_times import StepTimes

    client = Client(router)
    try:
        return {w.worker_id: StepTimes.from_stats(w.stats) for w in await client.workers(refresh=True)}
    finally:
        await client.close()


def thread_cpu(pgid: int) -> dict[tuple[int, int], float]:
    """CPU seconds of every thread of the cluster's worker processes."""
    out = {}
    for pid in (pid for role in ENGINE_ROLES for pid in pids_of(pgid, role)):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            except OSError:
                continue
            f = stat[stat.rfind(")") + 2:].split()
            out[(pid, int(tid))] = (int(f[11]) + int(f[12])) / CLK_TCK
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="built-in size or model directory")
    ap.add_argument("--disagg", action="store_true", help="the `pdserve up` defaults instead of --colocated")
    ap.add_argument("--rates", nargs="+", default=["4", "inf"])
    ap.add_argument("--worker-args", default="", help="passed to `pdserve up --worker-args`")
    ap.add_argument("--env", nargs="*", default=[], metavar="NAME=VALUE", help="environment for the cluster")
    ap.add_argument("--num-prompts", type=int, default=60)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-duration-s", type=float, default=240.0)
    ap.add_argument("--port", type=int, default=8150)
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/pdserve-served-steps"))
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model = resolve_model(args.model)
    proc = start(model, args.port, args.out_dir / "server.log", args)
    router = f"127.0.0.1:{args.port + 100}"
    try:
        if not wait_up(args.port, proc, 300):
            print(f"the cluster did not start; see {args.out_dir / 'server.log'}", file=sys.stderr)
            return 1
        for i, rate in enumerate(args.rates):
            cpu0, wall0, steps0 = thread_cpu(proc.pid), time.monotonic(), asyncio.run(step_counters(router))
            r = bench(args.port, model, rate, 1 + i, args.out_dir / f"bench-{i}.json", args, pgid=proc.pid)
            steps1, cpu1 = asyncio.run(step_counters(router)), thread_cpu(proc.pid)
            wall = time.monotonic() - wall0
            print(f"rate {rate}: {r['output_tok_s']:.0f} out tok/s, TTFT {r['ttft_mean_ms']:.1f} ms, "
                  f"TPOT {r['tpot_mean_ms']:.2f} ms, {r['completed']}/{r['sent']} done", flush=True)
            for wid, b in steps1.items():
                a = steps0.get(wid)
                if a is None:
                    continue
                nd, npf = b.num_decode_steps - a.num_decode_steps, b.num_prefill_steps - a.num_prefill_steps
                ds, ps = b.decode_step_seconds - a.decode_step_seconds, b.prefill_step_seconds - a.prefill_step_seconds
                print(f"  {wid}: decode steps {nd}, mean {1e3 * ds / max(nd, 1):.2f} ms at batch "
                      f"{(b.decode_step_seqs - a.decode_step_seqs) / max(nd, 1):.2f}; prefill steps {npf}, mean "
                      f"{1e3 * ps / max(npf, 1):.2f} ms for {(b.prefill_step_tokens - a.prefill_step_tokens) / max(npf, 1):.0f} "
                      f"prompt tokens; in steps {ds + ps:.2f} s of {wall:.1f} s", flush=True)
            busy = sorted(((c - cpu0.get(k, 0.0), k) for k, c in cpu1.items()), reverse=True)
            print("  threads (cores kept busy): " + ", ".join(f"{pid}/{tid} {c / wall:.2f}"
                                                            for c, (pid, tid) in busy if c / wall >= 0.01), flush=True)
    finally:
        stop_server(proc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
