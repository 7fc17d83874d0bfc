"""Reservations that grow and are leased, with real processes: a 128K-context model on the default KV pool
serves chat requests without max_tokens, two at once (each used to reserve the whole pool); a prefill
slower than the reservation's lease keeps it by renewing, and nothing stays held afterwards.
(A reservation no prefill renews frees itself: tests/integration/test_transfer_auth.py.)"""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import aiohttp
import pytest

from integration_helpers import start_cluster
from pdserve import rpc
from pdserve.client import Client
from pdserve.cluster import ClusterSpec
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

CONTEXT = 131072
LEASE_S = 0.6


@pytest.fixture(scope="module")
def long_context_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with a generated config of 128K max_position_embeddings."""
    out = tmp_path_factory.mktemp("model-128k") / "tiny-128k"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["max_position_embeddings"] = CONTEXT
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def cluster(long_context_model):
    spec = ClusterSpec(model=str(long_context_model), num_prefill=1, num_decode=1,
                       router_args=["--local-prefill-threshold", "0", "--health-interval-s", "0.2"],
                       prefill_args=["--max-num-batched-tokens", "32"],
                       decode_args=["--reservation-timeout-s", str(LEASE_S)])  # default KV pool size
    c = start_cluster(spec)
    try:
        yield c
    finally:
        c.stop()


async def decode_stats(cluster) -> pb.WorkerStats:
    proc = next(p for p in cluster.procs if p.name.startswith("decode"))
    async with rpc.channel(proc.address) as ch:
        return await pb_grpc.DecodeWorkerStub(ch).Stats(pb.StatsRequest(), timeout=5)


async def first_chunks(session: aiohttp.ClientSession, url: str, text: str, num_chunks: int) -> list[dict]:
    """A streamed chat completion without max_tokens; the first few chunks, then hang up."""
    body = {"messages": [{"role": "user", "content": text}], "stream": True, "temperature": 0}
    chunks: list[dict] = []
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
                if len(chunks) >= num_chunks:
                    break
    return chunks


async def wait_nothing_held(cluster, timeout_s: float = 30.0) -> pb.WorkerStats:
    deadline = time.monotonic() + timeout_s
    while True:
        s = await decode_stats(cluster)
        if s.num_free_kv_blocks == s.num_kv_blocks and not s.num_reservations and not s.num_running:
            return s
        assert time.monotonic() < deadline, f"decode still holds blocks: {s}"
        await asyncio.sleep(0.1)


async def test_chat_without_max_tokens_on_a_128k_model_with_the_default_pool(cluster):
    stats = await decode_stats(cluster)
    assert stats.num_kv_blocks * stats.block_size <= CONTEXT  # the pool is no bigger than one full context
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        both = await asyncio.gather(first_chunks(session, cluster.http_url, "hello there", 4),
                                    first_chunks(session, cluster.http_url, "tell me a story", 4))
    assert all(len(chunks) == 4 for chunks in both)
    await wait_nothing_held(cluster)


async def test_a_prefill_slower_than_the_lease_keeps_its_reservation(cluster):
    before = await decode_stats(cluster)
    prompt = [(17 * i) % 2000 + 3 for i in range(1500)]  # 47 chunks of 32 tokens: well past one lease here
    async with Client(cluster.router_address) as client:
        result = await client.complete(prompt, max_tokens=4, temperature=0.0, ignore_eos=True, timeout_s=120)
    assert len(result.token_ids) == 4
    after = await wait_nothing_held(cluster)
    assert after.num_expired_reservations == before.num_expired_reservations
    assert after.num_reservation_renewals > before.num_reservation_renewals
