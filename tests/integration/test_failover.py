"""Kill tests with real processes: `kill -9` a prefill worker while it prefills and a decode worker
while it streams; the request still completes with exactly the fault-free tokens (greedy), the
survivors hold no leaked block, and no request outlives its deadline.

One module-scoped cluster (router + 2 prefill + 2 decode); each test first restarts whatever an
earlier test killed (`Cluster.restart`), so the tests also show that a restarted worker re-registers.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request

import grpc
import pytest

from integration_helpers import start_cluster, wait_until
from pdserve import rpc
from pdserve.client import Client
from pdserve.cluster import Cluster, ClusterSpec, Proc
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

CHUNK_TOKENS = 16  # small prefill chunks: a long prompt takes ~2 s to prefill, a wide window to kill in
LONG_PROMPT_LEN = 1800
DECODE_PROMPT_LEN = 100
DECODE_MAX_TOKENS = 600  # ~5 s of decoding on this machine: the kill lands mid-stream


def _prompt(n: int, seed: int) -> list[int]:
    return [10 + (seed * 7919 + i * 104729) % 2000 for i in range(n)]


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    spec = ClusterSpec(model=str(tiny_model_dir), num_prefill=2, num_decode=2,
                       router_args=["--local-prefill-threshold", "0", "--health-interval-s", "0.2",
                                    "--unhealthy-after", "2", "--max-retries", "3"],
                       worker_args=["--max-num-batched-tokens", str(CHUNK_TOKENS), "--kv-cache-memory-mb", "64",
                                    "--reservation-timeout-s", "10", "--transfer-timeout-s", "10"])
    c = start_cluster(spec)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Fault-free greedy tokens, computed offline with the workers' chunk size."""
    llm = LLMEngine(EngineConfig(model=str(tiny_model_dir), max_num_batched_tokens=CHUNK_TOKENS,
                                 kv_cache_memory_mb=64))

    def run(prompt: list[int], max_tokens: int) -> list[int]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return llm.generate([prompt], params)[0].token_ids
    return run


async def _full_strength(cluster: Cluster) -> None:
    """Restart every process an earlier test killed and wait until the router routes to all of them."""
    for proc in list(cluster.procs):
        if not proc.alive():
            cluster.restart(proc.name)
    await cluster.wait_ready(120)


def _proc_of(cluster: Cluster, worker_id: str) -> Proc:
    address = worker_id.rpartition("@")[2]
    return next(p for p in cluster.procs if p.address == address)


async def _busy_prefill(cluster: Cluster, timeout_s: float = 20.0) -> Proc:
    """The prefill worker that holds a request right now (asked directly, not through the router)."""
    procs = [p for p in cluster.procs if p.name.startswith("prefill-")]

    async def busy():
        for p in procs:
            async with rpc.channel(p.address) as ch:
                try:
                    s = await pb_grpc.PrefillWorkerStub(ch).Stats(pb.StatsRequest(), timeout=1.0)
                except grpc.aio.AioRpcError:
                    continue
                if s.num_running or s.num_waiting or s.num_requests_active:
                    return p
        return None
    return await wait_until(busy, timeout_s=timeout_s, interval_s=0.02, what="a prefill worker busy")


async def healthy_workers_free(client: Client) -> bool:
    """Like all_blocks_free, but only over the workers the router still routes to (a dead one keeps
    its last stats)."""
    workers = [w for w in await client.workers() if w.healthy]
    return bool(workers) and all(
        w.stats.num_free_kv_blocks == w.stats.num_kv_blocks and w.stats.num_reservations == 0
        and w.stats.num_requests_active == 0 and w.stats.num_running == 0 and w.stats.num_waiting == 0
        for w in workers)


def router_running(cluster: Cluster) -> float:
    """The router's count of requests in flight (its `pdserve:num_requests_running` gauge)."""
    text = urllib.request.urlopen(f"{cluster.http_url}/metrics", timeout=5).read().decode()
    values = [float(v) for v in re.findall(r"^pdserve:num_requests_running\{[^}]*\} (\S+)$", text, re.M)]
    return sum(values)


async def _settled(cluster: Cluster, client: Client, dead: Proc) -> None:
    """(c): the router has taken the dead worker out, survivors hold nothing, the router holds nothing."""
    async def dead_is_out():
        return not any(w.healthy and w.address == dead.address for w in await client.workers())
    await wait_until(dead_is_out, timeout_s=10, what=f"{dead.name} marked unhealthy")
    await wait_until(lambda: healthy_workers_free(client), timeout_s=30, what="survivors hold no blocks")

    async def router_idle():
        return router_running(cluster) == 0
    await wait_until(router_idle, timeout_s=10, what="router has no request in flight")


async def test_prefill_killed_while_prefilling_request_completes_elsewhere(cluster, reference):
    await _full_strength(cluster)
    prompt = _prompt(LONG_PROMPT_LEN, seed=1)
    expected = reference(prompt, 8)
    async with Client(cluster.router_address) as client:
        deadline_s = 60.0
        t0 = time.monotonic()
        task = asyncio.create_task(client.complete(prompt, max_tokens=8, temperature=0.0, ignore_eos=True,
                                                   timeout_s=deadline_s))
        victim = await _busy_prefill(cluster)
        assert not task.done(), "prefill finished before the kill: make the prompt longer"
        cluster.kill(victim.name)
        result = await asyncio.wait_for(task, deadline_s)
        assert time.monotonic() - t0 < deadline_s  # (d)
        assert result.token_ids == expected
        assert result.finish_reason == "length"
        assert _proc_of(cluster, result.prefill_worker) is not victim
        await _settled(cluster, client, victim)


async def test_decode_killed_mid_stream_continues_without_gap_or_duplicate(cluster, reference):
    await _full_strength(cluster)
    prompt = _prompt(DECODE_PROMPT_LEN, seed=2)
    expected = reference(prompt, DECODE_MAX_TOKENS)
    async with Client(cluster.router_address) as client:
        deadline_s = 90.0
        t0 = time.monotonic()
        tokens: list[int] = []
        decode_workers: list[str] = []
        finish = ""
        victim = None
        async for msg in client.generate(prompt, max_tokens=DECODE_MAX_TOKENS, temperature=0.0, ignore_eos=True,
                                         timeout_s=deadline_s):
            tokens.extend(msg.token_ids)
            if msg.decode_worker and msg.decode_worker not in decode_workers:
                decode_workers.append(msg.decode_worker)
            if victim is None and len(tokens) >= 20:
                victim = _proc_of(cluster, decode_workers[0])
                cluster.kill(victim.name)
            finish = msg.finish_reason or finish
        assert time.monotonic() - t0 < deadline_s  # (d)
        assert victim is not None
        assert len(decode_workers) == 2, f"the stream did not move to another decode worker: {decode_workers}"
        assert len(tokens) == DECODE_MAX_TOKENS and finish == "length"
        assert tokens == expected  # no duplicate, no gap, same tokens
        await _settled(cluster, client, victim)


async def test_no_request_outlives_its_deadline_while_a_decode_worker_dies(cluster):
    await _full_strength(cluster)
    deadline_s = 3.0
    slack_s = 2.5  # a loaded 2-core machine; the point is "bounded", not "fast"
    async with Client(cluster.router_address) as client:
        async def one(i: int) -> tuple[float, str]:
            t0 = time.monotonic()
            try:
                r = await client.complete(_prompt(60 + 10 * i, seed=10 + i), max_tokens=1000, temperature=0.0,
                                          ignore_eos=True, timeout_s=deadline_s)
                outcome = r.finish_reason
            except grpc.aio.AioRpcError as exc:
                outcome = exc.code().name
            return time.monotonic() - t0, outcome

        # 6 x (prompt + 1000) tokens fit on the one decode worker left, so the moved streams are not refused.
        tasks = [asyncio.create_task(one(i)) for i in range(6)]
        decode_procs = [p for p in cluster.procs if p.name.startswith("decode-")]
        await wait_until(lambda: _any_streaming(client), timeout_s=deadline_s, interval_s=0.05, what="decoding")
        victim = decode_procs[0]
        cluster.kill(victim.name)
        results = await asyncio.gather(*tasks)
        for elapsed, outcome in results:
            assert elapsed < deadline_s + slack_s, (elapsed, outcome)
            assert outcome in ("DEADLINE_EXCEEDED", "length"), outcome
        await _settled(cluster, client, victim)


async def _any_streaming(client: Client) -> bool:
    return any(w.role == pb.DECODE and w.stats.num_running > 0 for w in await client.workers())


async def test_prefill_retry_while_the_old_transfer_still_drains(cluster):
    """A retry reaches the same prefill worker with the same request id while the first attempt's KV
    push (to a decode worker that died: here a listener that never answers) is still draining. The
    retry must be served (the stale attempt is cancelled and its blocks freed), not refused with
    "request id already in use"; in the end every block is free again."""
    import socket

    await _full_strength(cluster)
    prefill = next(p for p in cluster.procs if p.name.startswith("prefill-"))
    decode = next(p for p in cluster.procs if p.name.startswith("decode-"))
    prompt = _prompt(40, seed=77)
    req_id = "stale-transfer-retry"
    silent = socket.socket()  # accepts TCP connections (backlog) and never speaks UCX: pushes hang
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        async with rpc.channel(decode.address) as dch, rpc.channel(prefill.address) as pch:
            dstub, pstub = pb_grpc.DecodeWorkerStub(dch), pb_grpc.PrefillWorkerStub(pch)
            desc = await dstub.Reserve(pb.ReserveRequest(request_id=req_id, num_prompt_tokens=len(prompt),
                                                         max_tokens=4, timeout_s=30), timeout=10)
            desc.transfer_address = f"127.0.0.1:{silent.getsockname()[1]}"
            request = pb.PrefillRequest(request_id=req_id, prompt_token_ids=prompt, destination=desc,
                                        sampling=pb.SamplingOptions(temperature=0.0, max_tokens=4))
            first = await pstub.Prefill(request, timeout=30)
            second = await pstub.Prefill(request, timeout=30)  # the first push cannot have finished
            assert second.first_token_id == first.first_token_id
            await dstub.Release(pb.ReleaseRequest(request_id=req_id), timeout=10)
    finally:
        silent.close()
    async with Client(cluster.router_address) as client:
        from integration_helpers import all_blocks_free

        await wait_until(lambda: all_blocks_free(client), timeout_s=40, what="every block free")
