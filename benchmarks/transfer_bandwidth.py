"""Bandwidth of the transfer layer between two processes on one host, beside a plain ucxx endpoint and memcpy.

Spawns a receiver process (a UCXTransport plus a plain ucxx listener) and a sender process; the sender
times, for each size: UCXTransport.push() into the receiver (end to end: returns once the receiver
says DONE), one plain `ep.send` + 1-byte ack on a default ucxx endpoint, and a warm `np.copyto` of the
same bytes. Prints a table of median GB/s (1 GB = 1e9 bytes) and the UCX protocols/transports chosen,
parsed from UCX_PROTO_INFO output of the sender. Not a test; bounded by --timeout-s.

    .venv/bin/python benchmarks/transfer_bandwidth.py --sizes-mib 1 4 16 64 256 --iters 5
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

MiB = 1 << 20


def token_for(seed: int, size: int, i: int) -> bytes:
    return hashlib.sha256(f"{seed}/{size}/{i}".encode()).digest()[:16]


# ---- receiver process -------------------------------------------------------------------------------
async def run_receiver(args: argparse.Namespace) -> None:
    from pdserve.transfer.ucx import UCXTransport
    from pdserve.transfer.ucx_env import import_ucxx

    ucxx = import_ucxx()
    sizes = [s * MiB for s in args.sizes_mib]
    agent = UCXTransport(num_lanes=args.lanes, timeout_s=args.timeout_s)
    await agent.start()
    dst = np.zeros(max(sizes), dtype=np.uint8)
    agent.register_buffer("dst", dst)
    for size in sizes:
        for i in range(args.iters + 1):
            agent.expect(token_for(args.seed, size, i), "dst", [(0, size)], args.timeout_s)

    plain_dst = np.zeros(max(sizes), dtype=np.uint8)
    plain_done = asyncio.Event()

    async def plain_handler(ep) -> None:  # one message per iteration, each acked with one byte
        ack = np.ones(1, dtype=np.uint8)
        for size in sizes:
            for _ in range(args.iters + 1):
                await ep.recv(plain_dst[:size])
                await ep.send(ack)
        plain_done.set()

    listener = ucxx.create_listener(plain_handler)
    print(f"ADDRESS {agent.address} {listener.port}", flush=True)
    try:
        await asyncio.wait_for(plain_done.wait(), args.timeout_s)
        await asyncio.sleep(0.5)  # let the last ack leave
    finally:
        await agent.close()
        listener.close()


# ---- sender process ---------------------------------------------------------------------------------
def gbps(nbytes: int, seconds: list[float]) -> float:
    return nbytes / float(np.median(seconds)) / 1e9


async def run_sender(args: argparse.Namespace) -> None:
    from pdserve.transfer.ucx import UCXTransport
    from pdserve.transfer.ucx_env import available_transports, import_ucxx

    ucxx = import_ucxx()
    peer, plain_port = args.peer.split(",")
    sizes = [s * MiB for s in args.sizes_mib]
    agent = UCXTransport(num_lanes=args.lanes, timeout_s=args.timeout_s)
    await agent.start()
    src = np.random.default_rng(0).integers(0, 256, max(sizes), dtype=np.uint8)
    agent.register_buffer("src", src)
    results: dict[int, dict[str, float]] = {size: {} for size in sizes}
    for size in sizes:
        times = []
        for i in range(args.iters + 1):  # iteration 0 warms up (connects, page faults)
            started = time.perf_counter()
            await agent.push(peer, token_for(args.seed, size, i), "src", [(0, size)], [(0, size)])
            times.append(time.perf_counter() - started)
        results[size]["ours"] = gbps(size, times[1:])

    ep = await asyncio.wait_for(ucxx.create_endpoint(peer.rsplit(":", 1)[0], int(plain_port)), args.timeout_s)
    ack = np.empty(1, dtype=np.uint8)
    for size in sizes:
        times = []
        for _ in range(args.iters + 1):
            started = time.perf_counter()
            await asyncio.wait_for(ep.send(src[:size]), args.timeout_s)
            await asyncio.wait_for(ep.recv(ack), args.timeout_s)
            times.append(time.perf_counter() - started)
        results[size]["plain"] = gbps(size, times[1:])

    copy_dst = np.empty_like(src)
    for size in sizes:
        times = []
        for _ in range(args.iters + 1):
            started = time.perf_counter()
            np.copyto(copy_dst[:size], src[:size])
            times.append(time.perf_counter() - started)
        results[size]["memcpy"] = gbps(size, times[1:])
    ep.abort()
    await agent.close()
    print("RESULT " + json.dumps({"results": results, "transports": available_transports(),
                                  "stats": {"bytes_sent": agent.stats.bytes_sent}}), flush=True)


# ---- driver -----------------------------------------------------------------------------------------
PROTO_ROW = re.compile(r"\|\s+ucp_context_\d+ (intra-node|inter-node|self) cfg#(\d+) \| tagged message by "
                       r"ucp_tag_send\* from host memory")
RANGE_ROW = re.compile(r"\|\s+([0-9KMG.]+\.\.inf)\s+\|\s+(.+?)\s+\|\s+(\S+)\s+\|")


def parse_proto_info(output: str) -> list[str]:
    """'cfg#N intra-node: <protocol> over <transport>' for large tagged messages, one per endpoint config."""
    found: list[str] = []
    lines = output.splitlines()
    for k, line in enumerate(lines):
        head = PROTO_ROW.search(line)
        if not head:
            continue
        for row in lines[k + 1:k + 12]:
            match = RANGE_ROW.search(row)
            if match:
                found.append(f"cfg#{head.group(2)} {head.group(1)}: {match.group(2)} over {match.group(3)}")
                break
    return found


def drive(args: argparse.Namespace) -> int:
    env = dict(os.environ, UCX_WARN_UNUSED_ENV_VARS="n")
    common = ["--sizes-mib", *map(str, args.sizes_mib), "--iters", str(args.iters), "--lanes", str(args.lanes),
              "--timeout-s", str(args.timeout_s), "--seed", str(int(time.time()))]
    receiver = subprocess.Popen([sys.executable, __file__, "--role", "receiver", *common], env=env,
                                stdout=subprocess.PIPE, text=True)
    sender = None
    try:
        deadline = time.monotonic() + 60
        line = ""
        while not line.startswith("ADDRESS"):
            line = receiver.stdout.readline() if receiver.stdout else ""
            if not line and (receiver.poll() is not None or time.monotonic() > deadline):
                raise RuntimeError("receiver did not start")
        _, address, plain_port = line.split()
        sender_env = dict(env, UCX_PROTO_INFO="y", UCX_LOG_LEVEL="info")
        sender = subprocess.run([sys.executable, __file__, "--role", "sender", "--peer", f"{address},{plain_port}",
                                 *common], env=sender_env, capture_output=True, text=True, timeout=args.timeout_s)
        output = sender.stdout + sender.stderr
        result_line = next((l for l in sender.stdout.splitlines() if l.startswith("RESULT ")), None)
        if result_line is None:
            print(output[-4000:], file=sys.stderr)
            return 1
        report = json.loads(result_line[len("RESULT "):])
    finally:
        receiver.kill()
        receiver.wait(10)

    print(f"# transfer bandwidth, {time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} cpus, "
          f"lanes={args.lanes}, iters={args.iters} (median of timed iterations after one warm-up)")
    print("| size | ours GB/s | plain ucxx GB/s | memcpy GB/s | ours/plain | ours/memcpy |")
    print("|---:|---:|---:|---:|---:|---:|")
    for size_mib in args.sizes_mib:
        r = report["results"][str(size_mib * MiB)]
        print(f"| {size_mib} MiB | {r['ours']:.2f} | {r['plain']:.2f} | {r['memcpy']:.2f} | "
              f"{r['ours'] / r['plain']:.2f} | {r['ours'] / r['memcpy']:.2f} |")
    print(f"\nUCX transports available: {', '.join(report['transports'])}")
    print("UCX protocols chosen for large tagged messages (sender side, UCX_PROTO_INFO):")
    for row in dict.fromkeys(parse_proto_info(output)):
        print(f"  {row}")
    env_shown = {k: v for k, v in sorted(os.environ.items()) if k.startswith(("UCX_", "UCXPY_"))}
    print(f"UCX environment given: {env_shown or '(none; code defaults from pdserve.transfer.ucx_env)'}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 4, 16, 64, 256], help="push sizes in MiB")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per size (after one warm-up)")
    parser.add_argument("--lanes", type=int, default=4, help="UCXTransport num_lanes")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="bound on the whole run")
    parser.add_argument("--role", choices=["driver", "receiver", "sender"], default="driver", help=argparse.SUPPRESS)
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "receiver":
        asyncio.run(run_receiver(args))
        return 0
    if args.role == "sender":
        asyncio.run(run_sender(args))
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
