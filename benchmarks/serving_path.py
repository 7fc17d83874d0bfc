#!/usr/bin/env python3
"""The serving path's cost: CPU time per output token in each pdserve process, for one or more checkouts
side by side (e.g. main vs a branch), alternating.

For each model and mode (`pdserve up --colocated`, `pdserve up` defaults) and each round, every checkout
(`--checkout LABEL=DIR`: a source tree, run with this interpreter's packages) is started in turn and
loaded by the same `pdserve bench` runs as benchmarks/vs_vllm.py (random 256/64 tokens, 60 prompts, at each
`--rates`, each rate with its own prompts); around each run the CPU seconds (user + system, from /proc) of
every process of the cluster and of the bench client are read. Prints one table.

    python benchmarks/serving_path.py --checkout main=../main --checkout branch=. --models tiny small --rounds 2
    python benchmarks/serving_path.py --py-spy worker   # also record a py-spy profile of the worker(s)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from vs_vllm import group_cpu, port_in_use, resolve_model, stop_server, wait_up  # noqa: E402


def package_tree(checkout: Path, out: Path) -> Path:
    """A folder holding `pdserve` as `checkout` lays it out (pyproject's package-dir: engine/ is pdserve.engine,
    ...), made of links: with it first on the path, that checkout runs instead of the installed one."""
    import tomllib

    dirs = tomllib.loads((checkout / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    pkg = out / "pdserve"
    if out.exists():
        shutil.rmtree(out)
    pkg.mkdir(parents=True)
    for f in (checkout / dirs["pdserve"]).iterdir():
        (pkg / f.name).symlink_to(f.resolve())
    for name, rel in dirs.items():
        if name != "pdserve":
            (pkg / name.split(".", 1)[1]).symlink_to((checkout / rel).resolve())
    return out


def start(tree: Path, mode: str, model: Path, port: int, log: Path, env_extra: dict[str, str]) -> subprocess.Popen:
    argv = [sys.executable, "-m", "pdserve", "--log-level", "warning", "up", "--model", str(model), "--http-port", str(port),
            "--port", str(port + 100)]
    if mode == "colocated":
        argv[6:6] = ["--colocated", "--worker-args", "--num-threads 2"]
    env = {**os.environ, "UCX_WARN_UNUSED_ENV_VARS": "n", "PYTHONPATH": str(tree), **env_extra}
    return subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            cwd=tree)


def pids_of(pgid: int, role: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid \
                    and role.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                found.append(int(pid))
        except OSError:
            continue
    return found


def bench(tree: Path, port: int, model: Path, rate: str, seed: int, out_json: Path, args, pgid: int,
          spy: Path | None) -> dict:
    argv = [sys.executable, "-m", "pdserve", "--log-level", "warning", "bench", "--base-url", f"http://127.0.0.1:{port}",
            "--dataset", "random", "--num-prompts", str(args.num_prompts), "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--request-rate", rate, "--tokenizer", str(model),
            "--seed", str(seed), "--no-progress", "--max-duration-s", str(args.max_duration_s),
            "--result-json", str(out_json)]
    spies = []
    if spy is not None:
        for pid in pids_of(pgid, args.py_spy):
            spies.append(subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid),
                                           "--rate", "200", "--format", "raw", "--nonblocking", "--threads",
                                           *(["--gil"] if args.gil else []), "-o", f"{spy}-{pid}.txt"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)
    before = group_cpu(pgid)
    client0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, timeout=args.max_duration_s + 120, cwd=tree,
                   env={**os.environ, "PYTHONPATH": str(tree)})
    wall = time.monotonic() - t0
    after = group_cpu(pgid)
    for p in spies:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=30)
    client1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_client = client1.ru_utime + client1.ru_stime - client0.ru_utime - client0.ru_stime
    s = json.loads(out_json.read_text())["summary"]
    lat = s["latency"]
    n_out = s["total_output_tokens"]
    cpu = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    cpu["client"] = cpu_client
    return {"output_tok_s": s["output_throughput"], "completed": s["num_completed"], "sent": s["num_sent"],
            "ttft_mean_ms": lat["ttft"]["mean_ms"] if lat.get("ttft") else float("nan"),
            "tpot_mean_ms": lat["tpot"]["mean_ms"] if lat.get("tpot") else float("nan"),
            "wall_s": wall, "cpu": cpu, "n_out": n_out}


def summary(rows: list[dict], labels: list[str]) -> str:
    """A markdown table: means over rounds per model, mode, rate and checkout; ratios against the first."""
    lines = ["| model | mode | rate | checkout | out tok/s | vs first | mean TTFT ms | mean TPOT ms | done | "
             "CPU ms per output token (per process) |", "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    keys = list(dict.fromkeys((r["model"], r["mode"], r["rate"]) for r in rows))
    for model, mode, rate in keys:
        base = None
        for label in labels:
            rs = [r for r in rows if (r["model"], r["mode"], r["rate"], r["label"]) == (model, mode, rate, label)]
            if not rs:
                continue
            tok = sum(r["output_tok_s"] for r in rs) / len(rs)
            base = base or tok
            cpu: dict[str, float] = {}
            for r in rs:
                for k, v in r["cpu"].items():
                    cpu[k] = cpu.get(k, 0.0) + 1e3 * v / max(1, r["n_out"]) / len(rs)
            lines.append(
                f"| {model} | {mode} | {'all at once' if rate == 'inf' else rate + '/s'} | {label} | {tok:.0f} | "
                f"{tok / base:.2f}x | {sum(r['ttft_mean_ms'] for r in rs) / len(rs):.0f} | "
                f"{sum(r['tpot_mean_ms'] for r in rs) / len(rs):.1f} | "
                f"{sum(r['completed'] for r in rs)}/{sum(r['sent'] for r in rs)} | "
                + " ".join(f"{k} {v:.2f}" for k, v in sorted(cpu.items()) if v >= 0.005) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkout", action="append", default=[], metavar="LABEL=DIR[,NAME=VALUE...]",
                    help="a source tree to measure (repeat; default: this one), run with this interpreter's packages; "
                    "NAME=VALUE after it: environment variables for its cluster (not the bench client)")
    ap.add_argument("--models", nargs="+", default=["tiny"])
    ap.add_argument("--modes", nargs="+", default=["colocated", "disagg"], choices=["colocated", "disagg"])
    ap.add_argument("--rates", nargs="+", default=["inf", "4"])
    ap.add_argument("--rounds", type=int, default=1, help="alternations of the checkouts")
    ap.add_argument("--num-prompts", type=int, default=60)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-duration-s", type=float, default=240.0)
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/pdserve-serving-path"))
    ap.add_argument("--py-spy", default="", metavar="ROLE", help="record py-spy (raw folded stacks) of this role")
    ap.add_argument("--gil", action="store_true", help="with --py-spy: only samples holding the GIL")
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    checkouts = []
    for spec in args.checkout or ["this=" + str(ROOT)]:
        label, rest = spec.split("=", 1)
        d, *env = rest.split(",")
        checkouts.append((label, package_tree(Path(d), args.out_dir / f"tree-{label}"),
                          dict(e.split("=", 1) for e in env)))
    started, load0 = datetime.now(timezone.utc), os.getloadavg()
    rows = []
    port = 8300
    for name in args.models:
        model = resolve_model(name)
        for mode in args.modes:
            for rnd in range(args.rounds):
                for label, tree, env_extra in checkouts:
                    while port_in_use(port) or port_in_use(port + 100):
                        port += 1
                    log = args.out_dir / f"{name}-{mode}-{label}-{rnd}.log"
                    proc = start(tree, mode, model, port, log, env_extra)
                    try:
                        if not wait_up(port, proc, 300):
                            print(f"{label} {mode} did not start; see {log}", file=sys.stderr)
                            continue
                        time.sleep(2)
                        for i, rate in enumerate(args.rates):
                            spy = args.out_dir / f"spy-{name}-{mode}-{label}-{rnd}-{rate}" if args.py_spy else None
                            r = bench(tree, port, model, rate, 1 + i + 10 * rnd,
                                      args.out_dir / f"{name}-{mode}-{label}-{rnd}-{rate}.json", args, proc.pid, spy)
                            r.update(model=name, mode=mode, label=label, round=rnd, rate=rate)
                            rows.append(r)
                            per_tok = {k: 1e3 * v / max(1, r["n_out"]) for k, v in r["cpu"].items() if v > 0.05}
                            print(f"{name} {mode:9} {label:8} r{rnd} rate={rate:3}: {r['output_tok_s']:6.0f} tok/s "
                                  f"TTFT {r['ttft_mean_ms']:6.0f} TPOT {r['tpot_mean_ms']:6.1f} ms "
                                  f"{r['completed']}/{r['sent']}  CPU ms/out-token: "
                                  + " ".join(f"{k}={v:.3f}" for k, v in sorted(per_tok.items())), flush=True)
                    finally:
                        stop_server(proc)
                    port += 1
    load1 = os.getloadavg()
    print(f"\n{started:%Y-%m-%d %H:%M} UTC, load {load0[0]:.2f} -> {load1[0]:.2f}\n")
    print(summary(rows, [c[0] for c in checkouts]))
    (args.out_dir / "rows.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
