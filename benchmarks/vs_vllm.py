#!/usr/bin/env python3
"""pdserve against vLLM-CPU on the same model, the same cores and the same `pdserve bench` runs.

For each model: vLLM-CPU (`../shared/peers/vllm-cpu.sh serve`, float32), then `pdserve up`
(defaults: 1 prefill + 1 decode + store) and `pdserve up --colocated`, one after another, each
loaded by the same runs (random 256/64 tokens, 60 prompts, at 4 req/s and all at once; each run
with its own prompts, the same for every server, so no warm prefix cache flatters one). Prints a
table of ratios and writes it into docs/benchmarks.md.

Installs nothing: it needs the vLLM-CPU venv from `bash ../shared/peers/vllm-cpu.sh install`.

    python benchmarks/vs_vllm.py                      # built-in tiny and small
    python benchmarks/vs_vllm.py --models small --servers pdserve-colocated vllm
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_docs import replace_section  # noqa: E402

PEERS = ROOT.parent / "shared" / "peers"
SERVERS = ("vllm", "pdserve-disagg", "pdserve-colocated")
HEADING = "## pdserve vs vLLM-CPU"
VLLM_PORT = 8000  # where ../shared/peers/vllm-cpu.sh serve listens
CLK_TCK = os.sysconf("SC_CLK_TCK")
# pdserve's processes by their subcommand; vLLM's by the titles it gives them (VLLM::EngineCore, VLLM::Worker...)
ROLES = ("router", "prefill", "decode", "worker", "kvstore-master", "kvstore-node")


def process_role(words: list[str]) -> str:
    """A server process's role from its argv (vLLM rewrites its processes' titles)."""
    for w in words:
        if w in ROLES:
            return w
        if "EngineCore" in w:
            return "vllm-engine-core"
        if "Worker" in w and "VLLM" in w:
            return "vllm-worker"
    if "up" in words:
        return "up"
    return "vllm-api-server" if any("vllm" in w for w in words) else "other"


def group_cpu(pgid: int) -> dict[str, float]:
    """CPU seconds (user + system, each process and its reaped children) per role of the processes in `pgid`."""
    out: dict[str, float] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) != pgid:  # field 5: process group
            continue
        role = process_role([a.decode(errors="replace") for a in argv if a])
        cpu = sum(int(x) for x in fields[11:15]) / CLK_TCK  # utime stime cutime cstime
        out[role] = out.get(role, 0.0) + cpu
    return out


def cpu_ms_per_token(before: dict[str, float], after: dict[str, float], tokens: int) -> dict[str, float]:
    """CPU milliseconds per output token, per role, between two `group_cpu` readings."""
    return {role: 1000.0 * (after[role] - before.get(role, 0.0)) / max(tokens, 1)
            for role in sorted(after) if after[role] - before.get(role, 0.0) > 0.0}


def wait_up(port: int, proc: subprocess.Popen, timeout_s: float) -> bool:
    """True once /health and /v1/models both answer 200 (vLLM and pdserve alike)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            for path in ("/health", "/v1/models"):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                    if r.status != 200:
                        raise OSError(r.status)
            return True
        except OSError:
            time.sleep(1.0)
    return False


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_server(kind: str, model: Path, port: int, log: Path, args: argparse.Namespace) -> subprocess.Popen:
    pdserve = [sys.executable, "-m", "pdserve", "--log-level", "warning"]
    if kind == "vllm":
        argv = ["bash", str(args.vllm_script), "serve", str(model)]
    elif kind == "pdserve-disagg":
        argv = [*pdserve, "up", "--model", str(model), "--http-port", str(port), "--port", str(port + 100)]
    else:
        argv = [*pdserve, "up", "--colocated", "--model", str(model), "--http-port", str(port),
                "--port", str(port + 100)]
    env = {**os.environ, "UCX_WARN_UNUSED_ENV_VARS": "n"}
    return subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGINT to the whole process group (pdserve up stops its children; vLLM shuts down), then SIGKILL."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    time.sleep(2)  # let the ports and the cores go quiet before the next server


def bench(port: int, model: Path, rate: str, seed: int, out_json: Path, args: argparse.Namespace,
          pgid: int | None = None) -> dict:
    """One `pdserve bench` run; with `pgid` (the server's process group) also the CPU each of the server's
    processes spent per output token."""
    before = group_cpu(pgid) if pgid else {}
    argv = [sys.executable, "-m", "pdserve", "--log-level", "warning", "bench", "--base-url",
            f"http://127.0.0.1:{port}", "--dataset", "random", "--num-prompts", str(args.num_prompts),
            "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--request-rate", rate, "--tokenizer", str(model), "--seed", str(seed), "--no-progress",
            "--max-duration-s", str(args.max_duration_s), "--result-json", str(out_json)]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, timeout=args.max_duration_s + 120)
    after = group_cpu(pgid) if pgid else {}
    s = json.loads(out_json.read_text())["summary"]
    lat = s["latency"]
    tokens = s["total_output_tokens"]
    return {"output_tok_s": s["output_throughput"], "completed": s["num_completed"], "sent": s["num_sent"],
            "failed": s["num_failed"], "cpu_ms_per_token": cpu_ms_per_token(before, after, tokens),
            "ttft_mean_ms": lat["ttft"]["mean_ms"] if lat.get("ttft") else float("nan"),
            "tpot_mean_ms": lat["tpot"]["mean_ms"] if lat.get("tpot") else float("nan"),
            "ttft_p99_ms": lat["ttft"]["percentiles_ms"].get("p99", float("nan")) if lat.get("ttft") else float("nan")}


def resolve_model(name: str) -> Path:
    if name in ("tiny", "small"):
        from pdserve.engine.builtin_model import ensure_builtin_model

        return ensure_builtin_model(name)
    return Path(name)


def median_run(runs: list[dict]) -> dict:
    """Each figure's median over the rounds (one round: that round's figures)."""
    if not runs:
        return {}
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k not in ("round", "cpu_ms_per_token")}
    roles = sorted({role for r in runs for role in r.get("cpu_ms_per_token", {})})
    out["cpu_ms_per_token"] = {role: statistics.median(r.get("cpu_ms_per_token", {}).get(role, 0.0) for r in runs)
                               for role in roles}
    return out


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "small"], help="built-in sizes or model directories")
    ap.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    ap.add_argument("--vllm-script", type=Path, default=PEERS / "vllm-cpu.sh")
    ap.add_argument("--vllm-venv", type=Path, default=Path("/tmp/venv-vllm"))
    ap.add_argument("--num-prompts", type=int, default=60)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rates", nargs="+", default=["4", "inf"])
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every server this many times, the servers taking turns within each round (fresh "
                         "prompts per round, the same for every server); the table gives medians, and each ratio "
                         "is the median of the rounds' own ratios with their range")
    ap.add_argument("--max-duration-s", type=float, default=240.0, help="per bench run")
    ap.add_argument("--startup-timeout-s", type=float, default=300.0)
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/pdserve-vs-vllm"))
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave docs/ alone")
    args = ap.parse_args()

    if "vllm" in args.servers and not (args.vllm_venv / "bin" / "vllm").exists():
        print(f"vLLM-CPU is not installed at {args.vllm_venv}. Install it (about 3.4 GB, 2 minutes) with:\n"
              f"    bash {args.vllm_script} install\n"
              "or leave it out with --servers pdserve-disagg pdserve-colocated.", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    load_start = os.getloadavg()
    results: dict[tuple[str, str, str], list[dict]] = {}  # (model, server, rate) -> numbers, a dict per round
    port = 8100
    for name, rnd in ((n, r) for n in args.models for r in range(args.rounds)):
        model = resolve_model(name)
        for server in args.servers:
            log = args.out_dir / f"{name}-{server}.log"
            server_port = VLLM_PORT if server == "vllm" else port  # the peer script serves on 8000
            if port_in_use(server_port):  # a server left from an interrupted run would be measured instead
                print(f"[{name}] port {server_port} is already in use; stop what listens there first",
                      file=sys.stderr)
                return 1
            print(f"[{name}] round {rnd + 1}/{args.rounds}: starting {server} ...", flush=True)
            t0 = time.monotonic()
            proc = start_server(server, model, server_port, log, args)
            try:
                if not wait_up(server_port, proc, args.startup_timeout_s):
                    print(f"[{name}] {server} did not start; see {log}", file=sys.stderr)
                    continue
                print(f"[{name}] {server} up in {time.monotonic() - t0:.0f} s", flush=True)
                for i, rate in enumerate(args.rates):
                    seed = 1 + i + 100 * rnd  # fresh prompts per run, the same for every server
                    out_json = args.out_dir / f"{name}-{server}-rate{rate}-round{rnd + 1}.json"
                    r = bench(server_port, model, rate, seed, out_json, args, pgid=proc.pid)
                    results.setdefault((name, server, rate), []).append(r | {"round": rnd})
                    print(f"[{name}] {server} rate={rate}: {r['output_tok_s']:.0f} out tok/s, TTFT "
                          f"{r['ttft_mean_ms']:.0f} ms, TPOT {r['tpot_mean_ms']:.1f} ms, "
                          f"{r['completed']}/{r['sent']} done", flush=True)
            finally:
                stop_server(proc)
            port += 1
    body = render(results, args, started, load_start, os.getloadavg())
    print("\n" + body)
    if not args.no_doc:
        replace_section(args.doc, HEADING, body, keep="### Where the time goes")
        print(f"written to {args.doc}")
    return 0


def render(results: dict, args: argparse.Namespace, started: datetime, load_start, load_end) -> str:
    cmd = "python benchmarks/vs_vllm.py " + " ".join(sys.argv[1:])
    lines = [
        "`benchmarks/vs_vllm.py` serves the same model with vLLM-CPU 0.32 (`../shared/peers/vllm-cpu.sh serve`, "
        "float32, its defaults) and with pdserve (`pdserve up` defaults: 1 prefill + 1 decode + store; and "
        "`pdserve up --colocated`: one worker), one after another on the same 2 cores, each loaded by the same "
        f"`pdserve bench` runs: random {args.input_len}/{args.output_len} tokens, {args.num_prompts} prompts, at "
        f"{' and '.join(r if r != 'inf' else 'all at once' for r in args.rates)} req/s, each rate with its own "
        "prompts (the same for every server). Ratios are pdserve / vLLM"
        + (f"; {args.rounds} rounds, the servers taking turns in each: every figure is the median over the rounds, "
           "every ratio the median of the rounds' own ratios (their range in brackets)." if args.rounds > 1 else "."),
        "",
        f"- Command: `{cmd.strip()}`",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC; load average at start {load_start[0]:.2f}, at end "
        f"{load_end[0]:.2f} (anything else on the 2 cores makes absolute numbers noisy)",
        "",
        "| model | server | out tok/s all at once | vs vLLM | mean TTFT @4/s ms | vs vLLM | mean TPOT @4/s ms "
        "| vs vLLM | TTFT p99 @4/s ms | done |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in args.models:
        base_inf_runs = results.get((name, "vllm", "inf"), [])
        base_4_runs = results.get((name, "vllm", "4"), [])
        for server in args.servers:
            inf_runs, r4_runs = results.get((name, server, "inf"), []), results.get((name, server, "4"), [])
            if not inf_runs and not r4_runs:
                lines.append(f"| {name} | {server} | did not start | | | | | | | |")
                continue
            inf, r4 = median_run(inf_runs), median_run(r4_runs)

            def ratio(runs, base_runs, key):
                """The median of each round's own ratio (both servers measured in that round), and the range."""
                by_round = {b["round"]: b[key] for b in base_runs if b[key]}
                rs = sorted(r[key] / by_round[r["round"]] for r in runs if r["round"] in by_round)
                if not rs:
                    return "-"
                mid = fmt_ratio(statistics.median(rs))
                return mid if len(rs) == 1 else f"{mid} ({rs[0]:.2f}-{rs[-1]:.2f})"
            done = " ".join(f"{sum(r['completed'] for r in runs)}/{sum(r['sent'] for r in runs)}"
                            for runs in (r4_runs, inf_runs) if runs)
            lines.append(
                f"| {name} | {server} | {inf['output_tok_s']:.0f} | {ratio(inf_runs, base_inf_runs, 'output_tok_s')} | "
                f"{r4['ttft_mean_ms']:.0f} | {ratio(r4_runs, base_4_runs, 'ttft_mean_ms')} | {r4['tpot_mean_ms']:.1f} | "
                f"{ratio(r4_runs, base_4_runs, 'tpot_mean_ms')} | {r4['ttft_p99_ms']:.0f} | {done} |"
                if inf and r4 else f"| {name} | {server} | partial | | | | | | | {done} |")
    cpu_rows = []
    for name in args.models:
        for server in args.servers:
            for rate in args.rates:
                runs = results.get((name, server, rate), [])
                cpu = median_run(runs).get("cpu_ms_per_token") if runs else None
                if not cpu:
                    continue
                by_role = ", ".join(f"{k} {v:.2f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]))
                cpu_rows.append(f"| {name} | {server} | {'all at once' if rate == 'inf' else rate + '/s'} | "
                                f"{sum(cpu.values()):.2f} | {by_role} |")
    if cpu_rows:
        lines += ["", "CPU milliseconds per output token (user + system from /proc, every process of the server, "
                  "read around each bench run; medians over the rounds): where each server's cores went. The "
                  "bench client ran on the same cores for every server.", "",
                  "| model | server | rate | server CPU ms / token | by process |",
                  "|---|---|---|---:|---|", *cpu_rows]
    lines += ["", "Goals (issue 19): colocated >= 1.0x vLLM's output tok/s all at once and <= 1.0x its mean TTFT "
              "and TPOT at 4 req/s; disaggregated >= 0.8x all at once, with a TTFT at 4 req/s that does not grow "
              "without bound."]
    return "\n".join(lines)


if __name__ == "__main__":
    if shutil.which("bash") is None:
        sys.exit("bash is needed to start vLLM through ../shared/peers/vllm-cpu.sh")
    sys.exit(main())
