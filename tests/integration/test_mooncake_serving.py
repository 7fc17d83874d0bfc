"""The whole disaggregated path with `--kv-transport mooncake` in every process: router, prefill, decode, store master
and a store node; every KV byte (prefill -> decode pushes, store puts and loads) over Mooncake's Transfer Engine (TCP).

Greedy tokens equal the offline engine's; a prompt a fresh prefill worker finds in the store is loaded, not
recomputed; every block is released afterwards.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from integration_helpers import all_blocks_free, replace_prefill_worker, start_cluster, wait_until
from pdserve import rpc
from pdserve.client import Client
from pdserve.cluster import ClusterSpec
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.proto import kvstore_pb2 as kpb
from pdserve.proto import kvstore_pb2_grpc as kpb_grpc

NUM_NEW = 12
BLOCK = 16


@pytest.fixture(scope="module")
def mooncake_cluster(tiny_model_dir):
    from pdserve.transfer.mooncake import import_engine

    try:
        import_engine()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    transport = ["--kv-transport", "mooncake"]
    spec = ClusterSpec(model=str(tiny_model_dir), num_prefill=1, num_decode=1, num_store_nodes=1,
                       router_args=["--local-prefill-threshold", "0", "--health-interval-s", "0.2"],
                       worker_args=["--kv-cache-memory-mb", "64", "--max-num-batched-tokens", "64", *transport],
                       store_args=["--capacity-mb", "64", *transport])
    cluster = start_cluster(spec)
    try:
        yield cluster
    finally:
        cluster.stop()


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(10, 2048, (n,), generator=g).tolist() for n in (7, 150, 300)]


async def _complete(address: str, prompt: list[int]):
    async with Client(address) as client:
        return await client.complete(prompt, max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True, timeout_s=60)



def test_tokens_match_the_offline_engine_and_kv_crossed_over_mooncake(mooncake_cluster, tiny_model_dir):
    results = [asyncio.run(_complete(mooncake_cluster.router_address, p)) for p in _prompts()]
    offline = LLMEngine(EngineConfig(model=str(tiny_model_dir))).generate(
        _prompts(), SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True))
    assert [r.token_ids for r in results] == [o.token_ids for o in offline]
    assert all(r.prefill_worker.startswith("prefill@") and r.decode_worker.startswith("decode@") for r in results)

    async def check():
        async with Client(mooncake_cluster.router_address) as client:
            await wait_until(lambda: all_blocks_free(client), what="all blocks free")
            workers = await client.workers()
            return (sum(w.stats.kv_bytes_sent for w in workers if w.role == 1),
                    sum(w.stats.kv_bytes_received for w in workers if w.role == 2))
    sent, received = asyncio.run(check())
    assert received > 0 and sent >= received  # the prefill worker also pushes its new blocks to the store node
    for proc in mooncake_cluster.procs:
        if proc.name != "router" and proc.name != "kvstore-master":
            assert "mooncake transport: control" in proc.log_path.read_text(), proc.name


def test_stored_prefix_is_loaded_over_mooncake(mooncake_cluster):
    prompt = _prompts()[2]
    first = asyncio.run(_complete(mooncake_cluster.router_address, prompt))

    async def published():
        async with rpc.channel(mooncake_cluster.store_address) as ch:
            stats = await kpb_grpc.KVStoreMasterStub(ch).Stats(kpb.MasterStatsRequest(), timeout=5)
        return stats.num_keys >= len(prompt) // BLOCK
    asyncio.run(wait_until(published, timeout_s=30, what="prompt blocks published to the store"))

    replace_prefill_worker(mooncake_cluster)  # empty local cache: the prefix must come from the store node
    second = asyncio.run(_complete(mooncake_cluster.router_address, prompt))
    assert second.token_ids == first.token_ids
    assert second.usage.cached_tokens == ((len(prompt) - 1) // BLOCK) * BLOCK
