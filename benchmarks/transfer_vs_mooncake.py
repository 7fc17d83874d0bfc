"""KV transfer bandwidth like for like against Mooncake's Transfer Engine, measured side by side in one run.

Each method runs in a receiver process and a sender process, one pair at a time, for every size (median GB/s of
--iters timed pushes after one warm-up; 1 GB = 1e9 B); --runs repeats every method, alternating their order, and the
table gives the median over runs and each run's ratio. Two placements:

- one host: both processes on 127.0.0.1, each method with its best transport here: ours = UCXTransport.push() with
  the workers' defaults (every byte over UCX: OPEN -> READY -> tagged payload sends over UCX shared memory, sysv +
  CMA -> DONE), Mooncake TE = `transfer_sync_write` over its TCP transport (the non-CUDA wheel's only one without
  RDMA). Extra rows: ours with the opt-in direct paths (`--transfer-direct-paths`: the receiver copies the pushed
  regions out of the sender by CMA itself, OPEN_CMA -> DONE over a Unix socket), ours with the defaults forced onto
  UCX's TCP over loopback (--transfer-shared-memory off, the like-for-like transport), and our Mooncake backend
  (MooncakeTransport: token check + TE read).
- two hosts: sender and receiver in two network namespaces joined by veth pairs (deploy/netns/netns_lab.py; needs
  root and iproute2), each method over TCP: ours = UCXTransport with the defaults (host identity differs: tagged
  sends over UCX's TCP on the veth), Mooncake TE = `transfer_sync_write`. Extra row: ours with the opt-in direct
  paths (pushes up to 8 MiB as OPEN_STREAM + payload over one plain TCP connection, tcp_stream.py).

Every "ours" row that RATIO_METHODS names gets its ratio to Mooncake TE: the median over runs and each run's own
ratio (both sides measured in that run, minutes apart at most).

"ours" is end to end: the push returns after the receiver checked the one-time token, the payload landed and it
answered DONE. Mooncake TE's `transfer_sync_write` returns once the remote write completed (no authorisation).
Not a test; every wait is bounded.

    .venv/bin/python benchmarks/transfer_vs_mooncake.py --sizes-mib 4 16 64 256 --iters 20 --runs 3 --placements "one host"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy" / "netns"))
from transfer_bandwidth import gbps, token_for  # noqa: E402

MiB = 1 << 20
# method -> (process kind, UCX shared memory setting). "ucx" is UCXTransport as the workers run it by default;
# "ucx-direct" turns on the opt-in direct paths (cma_reads, stream_pushes: --transfer-direct-paths).
METHODS = {
    "ours (UCX, default)": ("ucx", "auto"),
    "ours (UCX, default, TCP only)": ("ucx", "off"),
    "ours (direct paths, opt-in)": ("ucx-direct", "auto"),
    "Mooncake TE": ("mooncake-te", ""),
    "ours (Mooncake backend)": ("mooncake-ours", ""),
}
RIVAL = "Mooncake TE"
# The rows whose ratio to RIVAL the table prints (the first is the headline: what a deployment gets by default).
RATIO_METHODS = ["ours (UCX, default)", "ours (direct paths, opt-in)"]
PLACEMENTS = {
    "one host": ["ours (UCX, default)", "Mooncake TE", "ours (direct paths, opt-in)", "ours (UCX, default, TCP only)",
                 "ours (Mooncake backend)"],
    "two netns hosts, TCP": ["ours (UCX, default)", "Mooncake TE", "ours (direct paths, opt-in)"],
}


# ---- the two processes ------------------------------------------------------------------------------
def _transport(kind: str, host: str, shared_memory: str, args: argparse.Namespace):
    if kind in ("ucx", "ucx-direct"):
        from pdserve.transfer.ucx import UCXTransport

        return UCXTransport(host, 0, num_lanes=args.ucx_lanes, timeout_s=args.timeout_s, shared_memory=shared_memory,
                            lane_min_bytes=args.ucx_lane_min_mib * MiB,
                            network_lane_min_bytes=args.ucx_network_lane_min_mib * MiB, cma_reads=kind == "ucx-direct",
                            stream_pushes=kind == "ucx-direct")
    from pdserve.transfer.mooncake import MooncakeTransport

    return MooncakeTransport(host, 0, timeout_s=args.timeout_s)


def _raw_engine(host: str):
    from pdserve.transfer.mooncake import import_engine

    engine = import_engine()()
    if engine.initialize(host, "P2PHANDSHAKE", "tcp", "") != 0:
        raise RuntimeError("Mooncake TransferEngine.initialize failed")
    return engine, f"{host}:{engine.get_rpc_port()}"


async def receiver(args: argparse.Namespace) -> None:
    sizes = [s * MiB for s in args.sizes_mib]
    dst = np.zeros(max(sizes), dtype=np.uint8)
    if args.kind == "mooncake-te":
        engine, session = _raw_engine(args.host)
        assert engine.register_memory(dst.ctypes.data, dst.nbytes) == 0
        print("READY " + json.dumps({"session": session, "ptr": dst.ctypes.data}), flush=True)
        await asyncio.sleep(args.timeout_s)
        return
    transport = _transport(args.kind, args.host, args.shared_memory, args)
    transport.register_buffer("dst", dst)
    await transport.start()
    for size in sizes:
        for i in range(args.iters + 1):
            transport.expect(token_for(args.seed, size, i), "dst", [(0, size)], args.timeout_s)
    print("READY " + json.dumps({"address": transport.address}), flush=True)
    await asyncio.sleep(args.timeout_s)


async def sender(args: argparse.Namespace) -> None:
    sizes = [s * MiB for s in args.sizes_mib]
    peer = json.loads(args.peer)
    src = np.random.default_rng(0).integers(0, 256, max(sizes), dtype=np.uint8)
    results: dict[int, float] = {}
    if args.kind == "mooncake-te":
        engine, _ = _raw_engine(args.host)
        assert engine.register_memory(src.ctypes.data, src.nbytes) == 0
        for size in sizes:
            times = []
            for _ in range(args.iters + 1):
                started = time.perf_counter()
                rc = engine.transfer_sync_write(peer["session"], src.ctypes.data, peer["ptr"], size)
                times.append(time.perf_counter() - started)
                if rc != 0:
                    raise RuntimeError(f"transfer_sync_write returned {rc}")
            results[size] = gbps(size, times[1:])
    else:
        transport = _transport(args.kind, args.host, args.shared_memory, args)
        transport.register_buffer("src", src)
        await transport.start()
        for size in sizes:
            times = []
            for i in range(args.iters + 1):  # iteration 0 warms up (connects, page faults)
                started = time.perf_counter()
                await transport.push(peer["address"], token_for(args.seed, size, i), "src", [(0, size)], [(0, size)])
                times.append(time.perf_counter() - started)
            results[size] = gbps(size, times[1:])
        await transport.close()
    print("RESULT " + json.dumps(results), flush=True)


# ---- driver -----------------------------------------------------------------------------------------
def _run_pair(method: str, args: argparse.Namespace, recv_prefix: list[str], send_prefix: list[str], recv_host: str,
              send_host: str) -> dict[int, float]:
    kind, shared_memory = METHODS[method]
    common = ["--sizes-mib", *map(str, args.sizes_mib), "--iters", str(args.iters), "--timeout-s",
              str(args.timeout_s), "--seed", str(time.time_ns()), "--kind", kind, "--shared-memory",
              shared_memory or "auto", "--ucx-lanes", str(args.ucx_lanes), "--ucx-lane-min-mib", str(args.ucx_lane_min_mib),
              "--ucx-network-lane-min-mib", str(args.ucx_network_lane_min_mib)]
    env = dict(os.environ, UCX_WARN_UNUSED_ENV_VARS="n", MC_LOG_LEVEL="ERROR")
    recv = subprocess.Popen([*recv_prefix, sys.executable, __file__, "--role", "receiver", "--host", recv_host,
                             *common], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        line = ""
        while not line.startswith("READY"):
            line = recv.stdout.readline() if recv.stdout else ""
            if not line and (recv.poll() is not None or time.monotonic() > deadline):
                raise RuntimeError(f"{kind} receiver did not start")
        out = subprocess.run([*send_prefix, sys.executable, __file__, "--role", "sender", "--host", send_host,
                              "--peer", line[len("READY "):].strip(), *common], capture_output=True, text=True,
                             timeout=args.timeout_s, env=env)
        result = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if result is None:
            raise RuntimeError(f"{kind} sender failed:\n{out.stderr[-3000:]}")
        return {int(k): v for k, v in json.loads(result[len("RESULT "):]).items()}
    finally:
        recv.kill()
        recv.wait(10)


def _table(title: str, methods: list[str], runs: dict[str, list[dict[int, float]]], sizes_mib: list[int]) -> str:
    """Median GB/s over the runs per method, and each RATIO_METHODS row's ratio to RIVAL: median and each run's."""
    ratio_methods = [m for m in RATIO_METHODS if m in methods]
    head = (f"| size | {' | '.join(f'{m} GB/s' for m in methods)} | "
            + " | ".join(f"{m} / {RIVAL} (median; each run)" for m in ratio_methods) + " |")
    rows = [f"\n### {title}\n", head, "|---:|" + "---:|" * (len(methods) + len(ratio_methods))]
    for size_mib in sizes_mib:
        size = size_mib * MiB
        medians = [float(np.median([run[size] for run in runs[m]])) for m in methods]
        cells = []
        for i, m in enumerate(ratio_methods):
            ratios = [a[size] / b[size] for a, b in zip(runs[m], runs[RIVAL])]
            median = f"{float(np.median(ratios)):.2f}x"
            cells.append(f"{'**' + median + '**' if i == 0 else median}; {' / '.join(f'{r:.2f}' for r in ratios)}")
        rows.append(f"| {size_mib} MiB | {' | '.join(f'{v:.2f}' for v in medians)} | {' | '.join(cells)} |")
    return "\n".join(rows)


def drive(args: argparse.Namespace) -> int:
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    out = [f"# transfer vs Mooncake TE, {started}, {os.cpu_count()} cpus, load average before "
           f"{load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f}, {args.runs} runs x {args.iters} pushes "
           f"(median after one warm-up), UCX lanes {args.ucx_lanes}, one more lane per {args.ucx_lane_min_mib} MiB (shared memory) / {args.ucx_network_lane_min_mib} MiB (network)"]
    for placement in args.placements:
        methods = PLACEMENTS[placement]
        runs: dict[str, list[dict[int, float]]] = {m: [] for m in methods}
        # Each run measures every method once, alternating the order, so load changes hit both sides alike.
        orders = [methods if r % 2 == 0 else methods[::-1] for r in range(args.runs)]
        if placement == "one host":
            for order in orders:
                for method in order:
                    runs[method].append(_run_pair(method, args, [], [], "127.0.0.1", "127.0.0.1"))
        else:
            from netns_lab import Lab, remove_leftovers

            if os.geteuid() != 0:
                out.append(f"\n### {placement}\n\nskipped: needs root (network namespaces)")
                continue
            remove_leftovers()
            lab = Lab(Path(args.log_dir or "/tmp/pds-bench-netns"))
            try:
                lab.build(["sender", "receiver"])
                s, r = lab.hosts["sender"], lab.hosts["receiver"]
                for order in orders:
                    for method in order:
                        runs[method].append(_run_pair(method, args, ["ip", "netns", "exec", r.ns],
                                                      ["ip", "netns", "exec", s.ns], r.address, s.address))
            finally:
                lab.close()
        out.append(_table(placement, methods, runs, args.sizes_mib))
        print(out[-1], flush=True)
    load_after = os.getloadavg()
    out.append(f"\nload average after: {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f}; UCX env "
               f"given: {({k: v for k, v in os.environ.items() if k.startswith('UCX_')}) or '(code defaults)'}; "
               f"MC env given: {({k: v for k, v in os.environ.items() if k.startswith('MC_')}) or '(defaults)'}")
    print(out[0])
    print(out[-1])
    if args.markdown_out:
        Path(args.markdown_out).write_text("\n".join(out) + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[4, 16, 64, 256], help="push sizes in MiB")
    parser.add_argument("--iters", type=int, default=5, help="timed pushes per size (after one warm-up)")
    parser.add_argument("--runs", type=int, default=3, help="runs per placement, each measuring every method once")
    parser.add_argument("--placements", nargs="+", default=list(PLACEMENTS), choices=list(PLACEMENTS))
    parser.add_argument("--timeout-s", type=float, default=300.0, help="bound on each process")
    parser.add_argument("--ucx-lanes", type=int, default=4, help="UCXTransport num_lanes (the workers' default)")
    parser.add_argument("--ucx-lane-min-mib", type=int, default=16, help="UCXTransport lane_min_bytes in MiB")
    parser.add_argument("--ucx-network-lane-min-mib", type=int, default=2,
                        help="UCXTransport network_lane_min_bytes in MiB (peers without shared memory)")
    parser.add_argument("--log-dir", default="", help="netns lab logs (default /tmp/pds-bench-netns)")
    parser.add_argument("--markdown-out", default="", help="also write the tables here")
    parser.add_argument("--role", choices=["driver", "receiver", "sender"], default="driver", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="ucx", help=argparse.SUPPRESS)
    parser.add_argument("--shared-memory", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--peer", default="", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "receiver":
        asyncio.run(receiver(args))
        return 0
    if args.role == "sender":
        asyncio.run(sender(args))
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
