"""Calibration of the simulator's workers on the real engine (`pdserve simulate --calibrate FILE`):
the step time of prefill chunks of several sizes and of decode batches of several sizes and contexts,
measured on an LLMEngine built exactly as a worker builds it (same EngineConfig flags, its threads),
(the fastest of a few repeats: the engine's own cost, without other processes' contention, which
the simulator models apart with --num-cores) fitted by least squares to StepModel (fixed + per decode sequence + per prefill token + per context
token), plus the KV bytes per token of its cache layout. Written as JSON (planner/simulator.py
Calibration)."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np

from pdserve.engine.config import EngineConfig
from pdserve.engine.sampling_params import SamplingParams
from pdserve.planner.model import StepModel
from pdserve.planner.simulator import Calibration
from pdserve.proto import pdserve_pb2 as pb

logger = logging.getLogger(__name__)

CHUNKS = (16, 64, 128, 256, 512)
BATCHES = (1, 2, 4, 8, 16)
CONTEXTS = (32, 256)


def calibrate(engine_config: EngineConfig, repeats: int = 5, transfer_bytes_per_s: float = 1e9) -> tuple[
        Calibration, list[dict]]:
    """(the fitted calibration, every measured sample)."""
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.worker_runtime import resolve_model

    llm = LLMEngine(resolve_model(engine_config))
    vocab = llm.model_config.vocab_size
    greedy = dict(temperature=0.0, ignore_eos=True)
    samples: list[dict] = []
    n = 0

    def prompt(length: int) -> list[int]:
        nonlocal n
        n += 1
        return [(n * 7919 + i * 31) % (vocab - 10) + 5 for i in range(length)]  # distinct: no prefix hits

    def timed_step() -> float:
        t0 = time.perf_counter()
        llm.step()
        return time.perf_counter() - t0

    chunk_budget = llm.config.max_num_batched_tokens
    for chunk in [c for c in CHUNKS if c <= chunk_budget]:
        times = []
        for _ in range(repeats):
            llm.add_request(f"p{n}", prompt(chunk), SamplingParams(max_tokens=1, **greedy))
            times.append(timed_step())
            while llm.has_unfinished():
                llm.step()
        samples.append({"decode_seqs": 0, "prefill_tokens": chunk, "context_tokens": 0, "step_s": min(times)})
    for ctx in CONTEXTS:
        for batch in BATCHES:
            ids = [f"d{n}-{i}" for i in range(batch)]
            for rid in ids:
                llm.add_request(rid, prompt(ctx), SamplingParams(max_tokens=1024, **greedy))
            while any(llm.requests[r].num_computed_tokens < llm.requests[r].num_prompt_tokens for r in ids):
                llm.step()
            times = [timed_step() for _ in range(repeats)]
            samples.append({"decode_seqs": batch, "prefill_tokens": 0, "context_tokens": batch * ctx,
                            "step_s": min(times)})
            for rid in ids:
                llm.abort_request(rid)
            while llm.has_unfinished():
                llm.step()
    x = np.array([[1.0, s["decode_seqs"], s["prefill_tokens"], s["context_tokens"]] for s in samples])
    y = np.array([s["step_s"] for s in samples])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    coef = np.maximum(coef, [1e-5, 1e-6, 1e-7, 0.0])  # no negative costs from noise
    step = StepModel(*map(float, coef))
    layout = llm.kv_cache.layout()
    kv_bytes_per_token = int(llm.kv_cache.nbytes // (layout.num_blocks * layout.block_size))
    cal = Calibration(step=step, chunk_tokens=chunk_budget, prefill_chunk_ms=llm.config.prefill_chunk_ms,
                      min_prefill_chunk=llm.config.min_prefill_chunk, max_num_seqs=llm.config.max_num_seqs,
                      num_kv_blocks=layout.num_blocks, block_size=layout.block_size,
                      kv_bytes_per_token=kv_bytes_per_token, transfer_bytes_per_s=transfer_bytes_per_s)
    for s in samples:
        s["fit_s"] = step.step_s(s["decode_seqs"], s["prefill_tokens"], s["context_tokens"])
    return cal, samples


# ---- the serving stack around the engine ------------------------------------------------------
SERVING_BATCHES = (1, 4, 8)


def calibrate_serving(model: str, num_threads: int = 1, max_tokens: int = 48, rounds: int = 3,
                      prompt_len: int = 32, step: StepModel | None = None) -> tuple[dict, list[dict]]:
    """What a step's compute does not cover in a real deployment: one colocated worker (`pdserve.cluster`,
    the processes `pdserve up` runs) under B closed-loop streams for B in SERVING_BATCHES. Per B, the streams'
    token gap at the client against the worker's own decode step times (its WorkerStats step counters) gives
    the serving overhead of a decode step (the engine thread's loop, handing tokens to the gRPC streams under
    one GIL), fitted as `decode_overhead_s + decode_overhead_per_seq_s * B`; the router's and this client's CPU
    seconds per streamed token give `frontend_cpu_s_per_token` (CPU the workers do not get on a shared host).
    With `step` (the engine's own fitted step model), the worker's step times over it at the same batch give
    `serving_step_factor`: how much slower the engine steps inside a serving worker (its threads, gRPC and
    the event loop under one GIL; the mean step rather than the fastest) than alone. Then PREFILL_REQUESTS
    prompts of PREFILL_PROMPT_LEN tokens one at a time, on that worker and on a 1 prefill + 1 decode pair:
    the pair's prefill step over the colocated worker's is `remote_prefill_step_factor` (its KV leaves during
    its steps); the client's TTFT less the prefill step gives the local path's `hop_s` (half of it: the hop to
    the worker and the first token's way back) and the remote path's `remote_prefill_overhead_s` (beyond its
    3 hops: Reserve, Prefill, the token back). (A served prefill step measured this way, one prompt at a time,
    runs at the engine-alone speed, 0.89x on 2026-12-01; under load it runs 1.6x: so prefill keeps the decode
    steps' `serving_step_factor`, measured under load.)
    Returns (those Calibration fields, the samples)."""
    import asyncio

    from pdserve.cluster import ClusterSpec, start_cluster

    spec = ClusterSpec(model=model, num_prefill=0, num_decode=0, num_colocated=1, log_level="warning",
                       worker_args=["--num-threads", str(num_threads)], http_port=-1)
    cluster = start_cluster(spec)
    try:
        samples = asyncio.run(_serving_samples(cluster, max_tokens, rounds, prompt_len))
        local = asyncio.run(_prefill_samples(cluster, PREFILL_PROMPT_LEN, PREFILL_REQUESTS))
    finally:
        cluster.stop()
    pair = start_cluster(ClusterSpec(model=model, num_prefill=1, num_decode=1, log_level="warning",
                                     worker_args=["--num-threads", str(num_threads)], http_port=-1))
    try:
        remote = asyncio.run(_prefill_samples(pair, PREFILL_PROMPT_LEN, PREFILL_REQUESTS))
    finally:
        pair.stop()
    b = np.array([s["batch"] for s in samples])
    over = np.array([max(0.0, s["client_gap_s"] - s["engine_step_s"]) for s in samples])
    slope, intercept = np.polyfit(b, over, 1) if len(samples) > 1 else (0.0, float(over[0]))
    fields = {"decode_overhead_s": float(max(0.0, intercept)), "decode_overhead_per_seq_s": float(max(0.0, slope)),
              "frontend_cpu_s_per_token": float(np.median([s["frontend_cpu_s_per_token"] for s in samples]))}
    if step is not None:
        for s in samples:
            s["fit_step_s"] = step.step_s(round(s["batch"]), 0, int(s["batch"] * (prompt_len + max_tokens / 2)))
        fields["serving_step_factor"] = float(max(1.0, np.median([s["engine_step_s"] / s["fit_step_s"]
                                                                   for s in samples])))
    # the first token's path beyond the prefill step: local = the router's hop to the worker and the token's
    # way back (2 hops); remote = Reserve, Prefill and the token back (3 hops) plus whatever else it costs
    local_over = float(np.median([max(0.0, r["ttft_s"] - r["prefill_step_s"]) for r in local]))
    remote_over = float(np.median([max(0.0, r["ttft_s"] - r["prefill_step_s"]) for r in remote]))
    fields["hop_s"] = local_over / 2
    fields["remote_prefill_overhead_s"] = max(0.0, remote_over - 3 * fields["hop_s"])
    fields["remote_prefill_step_factor"] = float(max(1.0, np.median([r["prefill_step_s"] for r in remote])
                                                     / np.median([r["prefill_step_s"] for r in local])))
    samples = [*samples, {"local_prefill": local, "remote_prefill": remote}]
    return fields, samples


PREFILL_PROMPT_LEN = 256  # the served prefill samples: prompts of this many tokens, one at a time
PREFILL_REQUESTS = 6


async def _prefill_samples(cluster, prompt_len: int, n: int) -> list[dict]:
    """`n` requests one at a time, each a fresh `prompt_len`-token prompt and 2 output tokens: per request the
    client's TTFT and the step seconds the prefilling worker (the prefill worker if there is one) spent on
    its prefill steps (its WorkerStats step counters, before and after)."""
    from pdserve.client import Client
    from pdserve.engine.step_times import StepTimes

    async def counters(client: Client) -> StepTimes:
        workers = [w for w in await client.workers(refresh=True) if w.healthy]
        w = next((w for w in workers if w.role == pb.PREFILL), workers[0])
        return StepTimes.from_stats(w.stats)

    out = []
    async with Client(cluster.router_address) as client:
        await client.complete([5, 6, 7, 8] * 8, max_tokens=2)  # warm-up (and the remote path's first transfer)
        for i in range(n):
            prompt = [(i * 7919 + j * 31) % 300 + 5 for j in range(prompt_len)]
            before = await counters(client)
            t0, first = time.perf_counter(), None
            async for msg in client.generate(prompt, max_tokens=2, temperature=0.0, ignore_eos=True, timeout_s=60):
                if first is None and msg.token_ids:
                    first = time.perf_counter()
            after = await counters(client)
            out.append({"ttft_s": (first or time.perf_counter()) - t0,
                        "prefill_step_s": after.prefill_step_seconds - before.prefill_step_seconds,
                        "tokens": after.prefill_step_tokens - before.prefill_step_tokens})
    return out


async def _serving_samples(cluster, max_tokens: int, rounds: int, prompt_len: int) -> list[dict]:
    import asyncio
    import os
    from pathlib import Path

    from pdserve.client import Client
    from pdserve.engine.step_times import StepTimes

    router = next(p for p in cluster.procs if p.name == "router")
    tick = os.sysconf("SC_CLK_TCK")

    def frontend_cpu_s() -> float:
        fields = Path(f"/proc/{router.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick + sum(os.times()[:2])

    async def counters(client: Client) -> StepTimes:
        (worker,) = [w for w in await client.workers(refresh=True) if w.healthy]
        return StepTimes.from_stats(worker.stats)

    async def stream(client: Client, k: int, gaps: list[float]) -> int:
        tokens = 0
        for r in range(rounds):
            prompt = [(k * 977 + r * 131 + j) % 300 + 5 for j in range(prompt_len)]
            times = []
            async for msg in client.generate(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                             timeout_s=120):
                times.extend([time.perf_counter()] * len(msg.token_ids))
            tokens += len(times)
            if len(times) > 2:  # the first gap holds the prefill of a newcomer: from the second token on
                gaps.append((times[-1] - times[1]) / (len(times) - 2))
        return tokens

    samples = []
    async with Client(cluster.router_address) as client:
        await client.complete([5, 6, 7, 8], max_tokens=4)  # warm-up
        for batch in SERVING_BATCHES:
            gaps: list[float] = []
            before, cpu0, t0 = await counters(client), frontend_cpu_s(), time.perf_counter()
            tokens = sum(await asyncio.gather(*(stream(client, k, gaps) for k in range(batch))))
            after, cpu1, wall = await counters(client), frontend_cpu_s(), time.perf_counter() - t0
            steps = after.num_decode_steps - before.num_decode_steps
            samples.append({
                "batch": (after.decode_step_seqs - before.decode_step_seqs) / max(1, steps),
                "client_gap_s": float(np.median(gaps)),
                "engine_step_s": (after.decode_step_seconds - before.decode_step_seconds) / max(1, steps),
                "frontend_cpu_s_per_token": (cpu1 - cpu0) / max(1, tokens), "tokens_per_s": tokens / wall})
            logger.info("serving calibration at %d streams: %s", batch, samples[-1])
    return samples


# ---- how much of the cores a run gets on a shared host ----------------------------------------
def _decode_engine(engine_config: EngineConfig, batch: int, context: int):
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.worker_runtime import resolve_model

    llm = LLMEngine(resolve_model(engine_config))
    for i in range(batch):
        llm.add_request(f"probe{i}", [(i * 31 + j) % 300 + 5 for j in range(context)],
                        SamplingParams(max_tokens=llm.max_model_len - context, temperature=0.0, ignore_eos=True))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in llm.requests.values()):
        llm.step()
    return llm


def _probe_child(engine_config: EngineConfig, batch: int, context: int, seconds: float, start, results) -> None:
    llm = _decode_engine(engine_config, batch, context)
    results.put("ready")
    start.wait()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        llm.step()
        steps += 1
    results.put((time.perf_counter() - t0) / max(1, steps))


def contention_probe(engine_config: EngineConfig, num_engines: int, seconds: float = 2.0, batch: int = 4,
                     context: int = 64) -> dict:
    """`num_engines` engine processes (a config's workers, each with its threads) stepping decode batches all
    at once for `seconds`, against the same engine's fastest step alone: the slowdown. Under the simulator's
    fair-share model a step slows by (busy workers + other processes' runnable threads) / cores, so
    `outside_runnable = slowdown * cores - num_engines` (at least 0) is the other processes' share in the
    machine's state right now, for Simulation(outside_runnable=...). Measured just before a run, it is the
    contention the run will see from outside (others' load changes, so it is a snapshot)."""
    import multiprocessing

    from pdserve.engine.threads import available_cpus

    alone = _decode_engine(engine_config, batch, context)
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        alone.step()
        times.append(time.perf_counter() - t0)
    alone_s = float(np.median(sorted(times)[:10]))
    del alone
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per engine, as a worker process is
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_probe_child, args=(engine_config, batch, context, seconds, start, results),
                         daemon=True) for _ in range(num_engines)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            results.get(timeout=120)
        start.set()
        step_s = [results.get(timeout=seconds + 60) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    cores = available_cpus() / (engine_config.num_threads or 1)
    slowdown = float(np.mean(step_s)) / alone_s
    return {"alone_step_s": alone_s, "contended_step_s": float(np.mean(step_s)), "slowdown": slowdown,
            "num_engines": num_engines, "cores": cores, "outside_runnable": max(0.0, slowdown * cores - num_engines)}


# ---- the served step under a configuration's own load -----------------------------------------
def step_summary(deltas) -> dict:
    """Step counters (engine/step_times.py StepTimes, one per worker, over a run) summed over the workers:
    the mean pure-decode step (ms) and its batch, the prefill steps' ms per prompt token (their riding
    decodes included) and the decodes riding per prefill step."""
    n = sum(d.num_decode_steps for d in deltas)
    toks = sum(d.prefill_step_tokens for d in deltas)
    nan = float("nan")
    return {"decode_step_ms": 1e3 * sum(d.decode_step_seconds for d in deltas) / n if n else nan,
            "decode_batch": sum(d.decode_step_seqs for d in deltas) / n if n else nan,
            "prefill_ms_per_token": 1e3 * sum(d.prefill_step_seconds for d in deltas) / toks if toks else nan,
            "prefill_step_decodes": sum(d.prefill_step_decode_seqs for d in deltas) / max(1, sum(
                d.num_prefill_steps for d in deltas))}


def fit_step_factors(runs, split, cal: Calibration, router_config, measured: dict, iterations: int = 4,
                     **simulation_kwargs) -> tuple[Calibration, list[dict]]:
    """The served step under a configuration's own concurrency: `measured` is `step_summary` of real runs of
    `split` (its workers' step counters, summed over the runs) on `runs` (each run's SimRequests; one list of
    SimRequests is one run); simulate those same runs and scale `serving_step_factor` by measured / simulated
    pure-decode step and `serving_prefill_factor` by the prefill steps' ms per token likewise (less what the
    decode factor already moved), a few times (each factor changes the batches the next simulation sees).
    The factors then carry whatever that configuration's steps cost beyond the engine alone: the serving
    stack, N workers slowing each other on shared cores, others' load at that time. Returns (the calibration
    with the fitted factors, one row per iteration)."""
    import math

    from pdserve.planner.simulator import SimRequest, Simulation

    if runs and isinstance(runs[0], SimRequest):
        runs = [runs]
    history = []
    for _ in range(iterations):
        steps = []
        for requests in runs:
            sim = Simulation(requests, split, cal, router_config, **simulation_kwargs)
            sim.run()
            steps.extend(w.step_times for w in sim.workers)
        got = step_summary(steps)
        history.append({"serving_step_factor": cal.serving_step_factor,
                        "serving_prefill_factor": cal.serving_prefill_factor, **{f"sim_{k}": v for k, v in got.items()}})
        d_ratio = measured["decode_step_ms"] / got["decode_step_ms"]
        p_ratio = measured["prefill_ms_per_token"] / got["prefill_ms_per_token"]
        step, prefill = cal.serving_step_factor, cal.serving_prefill_factor
        if math.isfinite(d_ratio) and d_ratio > 0:
            step *= d_ratio
        if math.isfinite(p_ratio) and p_ratio > 0:
            # a prefill step's ms per token moves with the step factor too: take that part out
            prefill *= p_ratio / (d_ratio if math.isfinite(d_ratio) and d_ratio > 0 else 1.0)
        cal = replace(cal, serving_step_factor=float(step), serving_prefill_factor=float(max(0.05, prefill)))
    return cal, history
