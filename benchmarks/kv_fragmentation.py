"""KV of a Llama-3-8B-shaped cache pushed between two processes from a fresh and a churned block table.

The sender (this process) and a receiver subprocess each hold a paged pool of the 8B shape (32
layers, 8 KV heads x 128, bfloat16, 16-token blocks) registered with the UCX transport. For each
prompt length, each side's block table is either fresh (a new BlockManager) or churned (2,000
random allocate/free operations first, blocks still held scattered through the pool); the prompt's
blocks are allocated by the real BlockManager and pushed in one push() from the sender's pool into
the receiver's, with regions from the pools' layouts. A third table, checkerboard (every other block
held: no two free blocks adjacent), is the worst case for any allocator. With --history, side by side, the same bytes
addressed the pre-block-major way (layer-major pool, least-recently-freed allocation, last blocks freed first), and
the all-cached table with the eviction before run-aware eviction (cached blocks one at a time, least
recently freed first).
Every table is pushed three ways in one run, rotating the order: tagged UCX messages, one per piece, posted straight
into libucp and waited for as one batch (the default); the same messages as one ucxx request and future each (before,
`native_batches=False`); one batch of UCX RMA reads posted by the receiver (`rma_reads=True`, opt-in). Prints payload messages and RMA reads
per request, GB/s, the cost per extra region (checkerboard minus fresh), and the push time as a share of an
estimated prefill time of that prompt on this machine (8B-model FLOPs / measured GEMM FLOP/s).
Not a test; every wait is bounded.

    .venv/bin/python benchmarks/kv_fragmentation.py --tokens 1024 4096 16384 --iters 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import statistics
import sys
import time
from collections import OrderedDict

import torch

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
LRU_CACHED = "churned, all cached, LRU eviction (before)"
BATCH, TAGGED, READS = "tagged, one batch (after)", "tagged, a request per piece (before)", "RMA reads (opt-in)"
HIDDEN, NUM_PARAMS = 4096, 8.03e9  # Llama-3-8B


def pool(num_blocks: int):
    from pdserve.engine.kv_cache import PagedKVCache

    return PagedKVCache(NUM_LAYERS, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)


# ---- receiver process -------------------------------------------------------------------------------
async def run_receiver(args: argparse.Namespace) -> None:
    from pdserve.transfer.ucx import UCXTransport

    kv = pool(args.pool_blocks)
    transport = UCXTransport(num_lanes=args.lanes, timeout_s=args.timeout_s)
    await transport.start()
    transport.register_buffer("kv", kv.kv)
    print(f"ADDRESS {transport.address}", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or line.startswith("QUIT"):
            break
        _, token_hex, regions = line.split(" ", 2)
        transport.expect(bytes.fromhex(token_hex), "kv", [tuple(r) for r in json.loads(regions)], args.timeout_s)
        print("READY", flush=True)
    await transport.close()


# ---- block tables -----------------------------------------------------------------------------------
class OldAllocator:
    """The allocator before block-major (for the side-by-side row): least recently freed first, tail freed first."""

    def __init__(self, num_blocks: int) -> None:
        self.free_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    def allocate(self, n: int) -> list[int]:
        return [self.free_ids.popitem(last=False)[0] for _ in range(n)]

    def free(self, block_ids: list[int]) -> None:
        for b in reversed(block_ids):
            self.free_ids[b] = None


def lru_eviction_block_manager(num_blocks: int):
    """The block manager as it was before run-aware eviction (for the side-by-side row): when no empty block is
    left, cached blocks are evicted one at a time, least recently freed first, whatever their neighbours."""
    from pdserve.engine.block_manager import BlockManager

    class LRUEviction(BlockManager):
        def _evict(self, n: int) -> list[int]:
            return [self._cached_free.popitem(last=False)[0] for _ in range(n)]
    return LRUEviction(num_blocks, BLOCK_SIZE)


def churned(allocator, num_ops: int, keep_free: int, seed: int, cache: bool = False):
    """`num_ops` random allocate (1-64 blocks) / free operations; what is still held stays held. `cache`:
    every allocated block is entered into the prefix cache first (as full prompt blocks are), so freed
    blocks stay cached and later allocations must evict them: the steady state of a long-running worker."""
    from pdserve.engine.block_hash import BlockHash

    rng = random.Random(seed)
    held: list[list[int]] = []
    for op in range(num_ops):
        n = rng.randint(1, 64)
        if held and (rng.random() < 0.5 or allocator.num_free_blocks - n < keep_free):
            allocator.free(held.pop(rng.randrange(len(held))))
        elif allocator.num_free_blocks - n >= keep_free:
            held.append(allocator.allocate(n))
            if cache:
                for i, b in enumerate(held[-1]):
                    allocator.register(b, BlockHash((op * 64 + i).to_bytes(16, "little")))
    return allocator


def checkerboard(allocator, num_blocks: int):
    """The worst case: every other block held, so no two free blocks are adjacent."""
    blocks = allocator.allocate(num_blocks)
    allocator.free(blocks[1::2])
    return allocator


def layer_major_regions(num_blocks: int, block_ids: list[int]) -> list[tuple[int, int]]:
    """Regions of the old [layer, K/V, block, ...] pool: 2 x layers x runs."""
    from pdserve.engine.kv_cache import block_runs

    kv_block = BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM * 2
    return [(((layer * 2 + kind) * num_blocks + start) * kv_block, count * kv_block)
            for layer in range(NUM_LAYERS) for kind in (0, 1) for start, count in block_runs(block_ids)]


# ---- prefill time estimate --------------------------------------------------------------------------
def gemm_flops_per_s(threads: int) -> dict[str, float]:
    """Best of a few 2048^3 GEMMs in float32 and bfloat16 with `threads` torch threads."""
    torch.set_num_threads(threads)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        best = float("inf")
        for _ in range(4):
            started = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - started)
        out[str(dtype).removeprefix("torch.")] = 2 * 2048 ** 3 / best
    return out


def prefill_flops(num_tokens: int) -> float:
    """Dense 8B forward: 2 x params x tokens for the weights, plus causal attention 2 x layers x T^2 x hidden."""
    return 2 * NUM_PARAMS * num_tokens + 2 * NUM_LAYERS * num_tokens ** 2 * HIDDEN


# ---- sender -----------------------------------------------------------------------------------------
async def run(args: argparse.Namespace) -> dict:
    from pdserve.engine.block_manager import BlockManager
    from pdserve.transfer.regions import pair_regions
    from pdserve.transfer.ucx import UCXTransport

    env = dict(os.environ, UCX_WARN_UNUSED_ENV_VARS="n")
    receiver = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--role", "receiver", "--pool-blocks", str(args.pool_blocks), "--lanes",
        str(args.lanes), "--timeout-s", str(args.timeout_s), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, env=env)

    async def receiver_line() -> str:
        """The receiver's next protocol line (UCX may print its warnings to stdout too)."""
        while True:
            line = (await asyncio.wait_for(receiver.stdout.readline(), 120)).decode()
            if not line or line.startswith(("ADDRESS", "READY")):
                return line

    async def expect(dst: list[tuple[int, int]]) -> bytes:
        """A fresh token the receiver expects `dst` under."""
        token = secrets.token_bytes(16)
        receiver.stdin.write(f"EXPECT {token.hex()} {json.dumps(dst)}\n".encode())
        await receiver.stdin.drain()
        answer = await receiver_line()
        if not answer.startswith("READY"):
            raise RuntimeError(f"receiver did not accept the expectation: {answer!r}")
        return token

    rows: list[dict] = []
    result: dict = {"rows": rows}
    try:
        line = await receiver_line()
        if not line.startswith("ADDRESS"):
            raise RuntimeError(f"receiver did not start: {line!r}")
        peer = line.split()[1]
        kv = pool(args.pool_blocks)
        kv.kv.view(torch.int16).random_(-1000, 1000)
        lay = kv.layout()
        # Two senders in this process, one receiver: the same bytes as one batch of RMA reads and as tagged sends.
        # cma_reads=False: these rows measure UCX's paths (one host pushes by CMA reads of the receiver by default).
        transports = {BATCH: UCXTransport(num_lanes=args.lanes, timeout_s=args.timeout_s, cma_reads=False),
                      TAGGED: UCXTransport(num_lanes=args.lanes, timeout_s=args.timeout_s, native_batches=False,
                                           cma_reads=False),
                      READS: UCXTransport(num_lanes=args.lanes, timeout_s=args.timeout_s, rma_reads=True,
                                          cma_reads=False)}
        for transport in transports.values():
            await transport.start()
            transport.register_buffer("kv", kv.kv)
        max_piece_bytes = transports[BATCH].max_piece_bytes
        layouts = ("block-major", "layer-major (before)") if args.history else ("block-major",)
        for num_tokens in args.tokens:
            n = -(-num_tokens // BLOCK_SIZE)
            for layout_name in layouts:
                states = ["fresh", "churned", "churned, all cached", "checkerboard"]
                if args.history and layout_name == "block-major":
                    states.insert(3, LRU_CACHED)
                for state in states:
                    if state == "checkerboard" and 2 * n > args.pool_blocks:
                        continue
                    if state in ("churned, all cached", LRU_CACHED) and layout_name != "block-major":
                        continue  # the old allocator had one tier: the same as churned
                    if state == LRU_CACHED:
                        sides = [lru_eviction_block_manager(args.pool_blocks) for _ in range(2)]
                    elif layout_name == "block-major":
                        sides = [BlockManager(args.pool_blocks, BLOCK_SIZE) for _ in range(2)]
                    else:
                        sides = [OldAllocator(args.pool_blocks) for _ in range(2)]
                    if state.startswith("churned"):
                        sides = [churned(a, args.churn_ops, n, seed, cache=state != "churned")
                                 for a, seed in zip(sides, (1, 2))]
                    elif state == "checkerboard":
                        sides = [checkerboard(a, args.pool_blocks) for a in sides]
                    src_ids, dst_ids = (a.allocate(n) for a in sides)
                    if layout_name == "block-major":
                        src, dst = lay.regions(src_ids), lay.regions(dst_ids)
                    else:
                        src, dst = (layer_major_regions(args.pool_blocks, ids) for ids in (src_ids, dst_ids))
                    num_pieces = len(pair_regions(src, dst, max_piece_bytes))
                    methods = list(transports) if layout_name == "block-major" else [BATCH]
                    times: dict[str, list[float]] = {m: [] for m in methods}
                    for it in range(args.iters + 1):  # the first round warms up (connect, page faults)
                        for method in methods[it % len(methods):] + methods[:it % len(methods)]:  # rotate the order
                            token = await expect(dst)
                            started = time.perf_counter()
                            nbytes = await transports[method].push(peer, token, "kv", src, dst,
                                                                   timeout_s=args.timeout_s)
                            times[method].append(time.perf_counter() - started)
                    for method in methods:
                        seconds = statistics.median(times[method][1:])
                        rows.append({"tokens": num_tokens, "layout": layout_name, "method": method, "table": state,
                                     "messages": 2 if method == READS else num_pieces,
                                     "reads": num_pieces if method == READS else 0,
                                     "src_runs": len(src), "dst_runs": len(dst), "bytes": nbytes,
                                     "seconds": seconds, "gbps": nbytes / seconds / 1e9})
                        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        result["per_region"] = await per_region_cost(args, transports, peer, expect)
        for transport in transports.values():
            await transport.close()
    finally:
        if receiver.returncode is None:
            receiver.stdin.write(b"QUIT\n")
            try:
                await asyncio.wait_for(receiver.wait(), 20)
            except asyncio.TimeoutError:
                receiver.kill()
                await receiver.wait()
    return result


async def per_region_cost(args: argparse.Namespace, transports: dict, peer: str, expect) -> list[dict]:
    """The same 64 MiB (the same source and destination bytes) pushed as one region and as N regions that cannot
    merge (source ascending, destination descending), both methods alternating: (t_N - t_1) / (N - 1) per region."""
    total = 64 << 20
    out = []
    for piece in (2 << 20, 256 << 10, 64 << 10):
        count = total // piece
        src_many = [(i * piece, piece) for i in range(count)]
        dst_many = [(total + (count - 1 - i) * piece, piece) for i in range(count)]
        shapes = {1: ([(0, total)], [(total, total)]), count: (src_many, dst_many)}
        times = {(m, k): [] for m in transports for k in shapes}
        for it in range(args.iters + 1):
            names = list(transports)
            for method in names[it % len(names):] + names[:it % len(names)]:
                for k, (src, dst) in shapes.items():
                    token = await expect(dst)
                    started = time.perf_counter()
                    await transports[method].push(peer, token, "kv", src, dst, timeout_s=args.timeout_s)
                    times[(method, k)].append(time.perf_counter() - started)
        for method in transports:
            one, many = (statistics.median(times[(method, k)][1:]) for k in (1, count))
            out.append({"method": method, "piece": piece, "regions": count, "one_s": one, "many_s": many,
                        "us_per_region": (many - one) / (count - 1) * 1e6})
            print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def report(args: argparse.Namespace, result: dict, flops: dict[str, float]) -> None:
    best = max(flops.values())
    print(f"# KV fragmentation, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} cpus, load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}, pool {args.pool_blocks} blocks "
          f"({args.pool_blocks * 2} MiB per side), churn {args.churn_ops} ops, lanes {args.lanes}, "
          f"median of {args.iters} pushes after one warm-up")
    print(f"GEMM on this CPU ({args.threads} threads, 2048^3): "
          + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in flops.items())
          + f"; prefill estimate = (2 x 8.03e9 x T + 2 x 32 x T^2 x 4096) FLOPs / {best / 1e9:.0f} GFLOP/s")
    print("| tokens | layout | method | block table | payload messages | RMA reads | regions src/dst | MiB | ms | GB/s "
          "| vs fresh | est. prefill s | push / prefill |")
    print("|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = result["rows"]
    fresh = {(r["tokens"], r["layout"], r["method"]): r for r in rows if r["table"] == "fresh"}
    for r in rows:
        prefill_s = prefill_flops(r["tokens"]) / best
        base = fresh[(r["tokens"], r["layout"], r["method"])]
        print(f"| {r['tokens']} | {r['layout']} | {r['method']} | {r['table']} | {r['messages']} | {r['reads']} | "
              f"{r['src_runs']}/{r['dst_runs']} | {r['bytes'] / 2**20:.0f} | {r['seconds'] * 1e3:.1f} | "
              f"{r['gbps']:.2f} | {r['gbps'] / base['gbps']:.2f} | {prefill_s:.0f} | {r['seconds'] / prefill_s:.2e} |")
    print()
    print("Cost per region: 64 MiB as one region and as N regions that cannot merge (same bytes), same run:")
    print("| method | region size | regions | one region ms | N regions ms | us per extra region |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in result.get("per_region", []):
        print(f"| {r['method']} | {r['piece'] >> 10} KiB | {r['regions']} | {r['one_s'] * 1e3:.1f} | "
              f"{r['many_s'] * 1e3:.1f} | {r['us_per_region']:.1f} |")
    print()
    print("Cost per extra region (checkerboard minus fresh, same method, same run):")
    for r in rows:
        base = fresh[(r["tokens"], r["layout"], r["method"])]
        extra = r["src_runs"] - base["src_runs"]
        if r["table"] == "checkerboard" and extra > 0:
            print(f"- {r['tokens']} tokens, {r['method']}: ({r['seconds'] * 1e3:.1f} - {base['seconds'] * 1e3:.1f}) ms "
                  f"/ {extra} regions = {(r['seconds'] - base['seconds']) / extra * 1e6:.1f} us per region")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384], help="prompt lengths")
    parser.add_argument("--iters", type=int, default=3, help="timed pushes per row (after one warm-up)")
    parser.add_argument("--pool-blocks", type=int, default=1536, help="blocks per side's pool (2 MiB each)")
    parser.add_argument("--churn-ops", type=int, default=2000, help="allocate/free operations before a churned push")
    parser.add_argument("--lanes", type=int, default=4, help="UCXTransport num_lanes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the GEMM measurement")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="bound on each push and wait")
    parser.add_argument("--history", action="store_true",
                        help="also the rows measured before block-major and run-aware eviction (layer-major pool, LRU "
                             "eviction; slow: tens of thousands of sends)")
    parser.add_argument("--role", choices=["driver", "receiver"], default="driver", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "receiver":
        asyncio.run(run_receiver(args))
        return 0
    if max(args.tokens) // BLOCK_SIZE > args.pool_blocks:
        parser.error("--pool-blocks is too small for the longest prompt")
    flops = gemm_flops_per_s(args.threads)
    result = asyncio.run(asyncio.wait_for(run(args), args.timeout_s * 20))
    report(args, result, flops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
