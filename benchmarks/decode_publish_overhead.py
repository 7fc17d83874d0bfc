"""What publishing generated blocks to the store costs a decode step, measured side by side in one run.

A real store (`pdserve kvstore-master` + `pdserve kvstore-node` processes) and, in this process, a
decode-shaped engine on its own thread (AsyncEngine) with the real KVStoreClient over the real
transport. Rounds alternate publishing off / on (`decode/block_publisher.py` hooked into the engine),
each round a batch of fresh prompts decoded to the same length; per round: mean step time of the
steps that only decode, tokens/s, blocks staged / dropped / put, and the engine-thread time spent
staging, and how long each block took from staging to the end of its put (the window in which a
decode failover loses that block). Prints a markdown table and the on/off ratio of the medians.

    .venv/bin/python benchmarks/decode_publish_overhead.py [--model small] [--batch 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

import grpc

from pdserve import rpc
from pdserve.cluster import Cluster, ClusterSpec
from pdserve.decode.block_publisher import GeneratedBlockPublisher
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.builtin_model import ensure_builtin_model
from pdserve.engine.config import EngineConfig
from pdserve.engine.connector import KV_BUFFER
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kvstore.client import KVStoreClient
from pdserve.proto import kvstore_pb2 as kpb
from pdserve.proto import kvstore_pb2_grpc as kpb_grpc
from pdserve.transfer.config import TransferConfig
from pdserve.transfer.factory import create_transport


async def _wait_store(master: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with rpc.channel(master) as ch:
        while True:
            try:
                stats = await kpb_grpc.KVStoreMasterStub(ch).Stats(kpb.MasterStatsRequest(), timeout=2)
                if stats.nodes:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"store at {master} not ready")
            await asyncio.sleep(0.1)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (from /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _round(engine: AsyncEngine, llm: LLMEngine, step_s: list, round_no: int, batch: int, prompt_len: int,
                 max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    prompts = [[10 + (round_no * 7919 + i * 104729 + j * 31) % 2000 for j in range(prompt_len)] for i in range(batch)]

    async def one(i: int) -> int:
        rid = f"r{round_no}-{i}"
        n = 0
        async for out in engine.generate(rid, lambda e, p=prompts[i]: e.add_request(rid, p, params)):
            n += len(out.new_token_ids)
        return n

    step_s.clear()
    t0 = time.perf_counter()
    n = sum(await asyncio.gather(*(one(i) for i in range(batch))))
    return n / (time.perf_counter() - t0)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="built-in model size (tiny|small) or a model directory")
    ap.add_argument("--batch", type=int, default=16, help="sequences decoded together")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=6, help="rounds per mode (off and on alternate)")
    ap.add_argument("--num-threads", type=int, default=1)
    ap.add_argument("--gather-s", type=float, default=0.005, help="the publisher's wait for more blocks before a put")
    ap.add_argument("--stage-only", action="store_true",
                    help="diagnosis: stage blocks but never put them (isolates the engine-thread copy)")
    args = ap.parse_args()

    model = args.model if os.path.isdir(args.model) else str(ensure_builtin_model(args.model))
    cluster = Cluster(ClusterSpec(model=model, num_prefill=0, num_decode=0, num_store_nodes=1,
                                  store_args=["--capacity-mb", "512"], log_dir=tempfile.mkdtemp(prefix="pubbench-")))
    cluster.start_store()
    transport = store = engine = None
    try:
        await _wait_store(cluster.store_address)
        llm = LLMEngine(EngineConfig(model=model, kv_cache_memory_mb=256, num_threads=args.num_threads))
        transport = create_transport(TransferConfig(), "127.0.0.1", 0, num_lanes=2, timeout_s=10)
        transport.register_buffer(KV_BUFFER, llm.kv_cache.kv)
        await transport.start()
        store = KVStoreClient(cluster.store_address, transport, llm.kv_cache, llm.fingerprint, timeout_s=5)
        await store.start()
        publisher = GeneratedBlockPublisher(store, llm.config.block_size, asyncio.get_running_loop(),
                                            gather_s=args.gather_s)
        if args.stage_only:
            async def no_put(staged):
                store._free_slots(list(staged.slots))
            store.put_staged = no_put

        step_s: list[float] = []
        decode_only: list[bool] = []
        plain_step = llm.step

        def timed_step():  # engine thread
            t = time.perf_counter()
            out = plain_step()
            step_s.append(time.perf_counter() - t)
            decode_only.append(all(s.num_computed_tokens > s.num_prompt_tokens for s in llm.scheduler.running))
            return out
        llm.step = timed_step
        engine = AsyncEngine(llm)
        engine.start()

        rows = []
        for r in range(2 * args.rounds + 1):  # round 0 warms up (kernels, allocator), then off/on alternate
            on = r > 0 and r % 2 == 0
            await engine.call(lambda e: setattr(e, "full_block_hook", publisher.on_full_blocks if on else None))
            before = (publisher.stats.num_staged_blocks, publisher.stats.num_dropped_blocks,
                      publisher.stats.num_puts, publisher.stats.stage_seconds)
            decode_only.clear()
            publisher.recent_settle_s.clear()
            cpu0 = _cpu_s(os.getpid()), sum(_cpu_s(p.pid) for p in cluster.procs)
            tok_s = await _round(engine, llm, step_s, r, args.batch, args.prompt_len, args.max_tokens)
            await publisher.wait_idle(30)
            cpu = _cpu_s(os.getpid()) - cpu0[0], sum(_cpu_s(p.pid) for p in cluster.procs) - cpu0[1]
            steps = [s for s, d in zip(step_s, decode_only) if d]
            s = publisher.stats
            if r == 0:
                continue
            settle = sorted(publisher.recent_settle_s) or [0.0]
            rows.append(dict(on=on, step_ms=1e3 * statistics.mean(steps), steps=len(steps), tok_s=tok_s,
                             settle_ms=[1e3 * settle[int(q * (len(settle) - 1))] for q in (0.5, 0.9, 1.0)],
                             staged=s.num_staged_blocks - before[0], dropped=s.num_dropped_blocks - before[1],
                             puts=s.num_puts - before[2], stage_ms=1e3 * (s.stage_seconds - before[3]),
                             cpu_ms=1e3 * cpu[0], store_cpu_ms=1e3 * cpu[1]))

        load = os.getloadavg()
        print(f"# decode publish overhead, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, "
              f"{os.cpu_count()} cpus, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, model {args.model}, "
              f"gather {args.gather_s} s, batch {args.batch}, prompt {args.prompt_len}, {args.max_tokens} tokens each, "
              f"block {llm.config.block_size} tokens = {llm.kv_cache.layout().block_nbytes / 2**10:.0f} KiB")
        print("| round | publish | decode steps | mean step ms | tok/s | blocks staged | dropped | puts | "
              "staging ms (engine thread) | CPU ms, this process | CPU ms, store processes | "
              "staged -> stored ms p50 / p90 / max |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for i, row in enumerate(rows, 1):
            print(f"| {i} | {'on' if row['on'] else 'off'} | {row['steps']} | {row['step_ms']:.2f} | "
                  f"{row['tok_s']:.0f} | {row['staged']} | {row['dropped']} | {row['puts']} | {row['stage_ms']:.1f} | "
                  f"{row['cpu_ms']:.0f} | {row['store_cpu_ms']:.0f} | "
                  + (" / ".join(f"{x:.1f}" for x in row["settle_ms"]) if row["on"] else "") + " |")
        med = {on: statistics.median(r["step_ms"] for r in rows if r["on"] == on) for on in (False, True)}
        pairs = [b["step_ms"] / a["step_ms"] for a, b in zip(rows[::2], rows[1::2])]  # each on round / the off before
        on_rows = [r for r in rows if r["on"]]
        staging_share = statistics.median(r["stage_ms"] / r["steps"] for r in on_rows) / med[False]
        print(f"\nmedian decode step: off {med[False]:.2f} ms, on {med[True]:.2f} ms ({med[True] / med[False]:.3f}x); "
              f"per pair on/off: {', '.join(f'{x:.2f}' for x in pairs)} (median {statistics.median(pairs):.3f}x); "
              f"engine-thread staging per decode step: {100 * staging_share:.1f}% of an off step; "
              f"store client failures {store.stats.num_failures}, published {store.stats.num_published_blocks} blocks")
        return 0
    finally:
        if engine is not None:
            await engine.stop()
        if store is not None:
            await store.close()
        if transport is not None:
            await transport.close()
        cluster.stop()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
