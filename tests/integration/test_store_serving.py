"""The KV cache store in the serving path, with real processes: router, prefill, decode, store
master and two store nodes, each a 1 MiB DRAM tier (16 blocks of the tiny model) over an SSD tier,
so every test here also runs under DRAM eviction pressure.

A prompt computed by one prefill worker is not recomputed by another (here: the prefill worker is
replaced by a fresh process with an empty local cache), tokens are identical with and without
store hits, and a store node killed with SIGKILL during load costs recomputation, never a failed
request or a changed token; the master stops placing blocks on the dead node.
"""

from __future__ import annotations

import asyncio
import signal

import pytest
import torch

from integration_helpers import replace_prefill_worker, scrape, total, wait_until
from pdserve import rpc
from pdserve.client import Client
from pdserve.cluster import Cluster, ClusterSpec
from pdserve.proto import kvstore_pb2 as kpb
from pdserve.proto import kvstore_pb2_grpc as kpb_grpc

NUM_NEW = 12


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 2048, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def store_cluster(tiny_model_dir, tmp_path_factory):
    spec = ClusterSpec(model=str(tiny_model_dir), num_prefill=1, num_decode=1, num_store_nodes=2,
                       router_args=["--local-prefill-threshold", "0", "--health-interval-s", "0.2"],
                       worker_args=["--kv-cache-memory-mb", "64", "--max-num-batched-tokens", "128"],
                       decode_args=["--store-publish-generated"],
                       store_args=["--capacity-mb", "1", "--ssd-dir", str(tmp_path_factory.mktemp("ssd")),
                                   "--ssd-mb", "64", "--ssd-batch-blocks", "4"],
                       log_dir=str(tmp_path_factory.mktemp("logs")))
    cluster = Cluster(spec)
    cluster.start(timeout_s=180)
    try:
        yield cluster
    finally:
        cluster.stop()


async def _master_stats(address: str) -> kpb.MasterStats:
    async with rpc.channel(address) as ch:
        return await kpb_grpc.KVStoreMasterStub(ch).Stats(kpb.MasterStatsRequest(), timeout=5)


async def _prefill_stats(client: Client, address: str):
    return next(w.stats for w in await client.workers() if w.address == address)


async def _complete(address: str, prompt: list[int]):
    async with Client(address) as client:
        return await client.complete(prompt, max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True, timeout_s=60)



def test_prefix_computed_once_is_loaded_not_recomputed(store_cluster):
    prompt = _prompt(300, seed=11)
    first = asyncio.run(_complete(store_cluster.router_address, prompt))
    full_blocks = len(prompt) // 16

    async def published():
        return (await _master_stats(store_cluster.store_address)).num_keys >= full_blocks
    asyncio.run(wait_until(published, timeout_s=30, what="prompt blocks published to the store"))

    new_address = replace_prefill_worker(store_cluster)
    second = asyncio.run(_complete(store_cluster.router_address, prompt))
    assert second.token_ids == first.token_ids  # parity with and without store hits
    expected_hits = ((len(prompt) - 1) // 16) * 16
    assert second.usage.cached_tokens == expected_hits

    async def prefill_counts():  # the router polls stats: wait until it has seen this request
        async with Client(store_cluster.router_address) as client:
            s = await _prefill_stats(client, new_address)
            return (s.store_hit_tokens, s.num_prompt_tokens_computed) if s.num_prompt_tokens_computed else None
    hits, computed = asyncio.run(wait_until(prefill_counts, timeout_s=10, what="new prefill worker's stats"))
    assert hits == expected_hits
    assert computed == len(prompt) - expected_hits  # only the tail was computed by the new worker

    # the store's own /metrics show the same story
    master = next(p for p in store_cluster.procs if p.name == "kvstore-master")
    m = scrape(master.metrics_url)
    assert total(m, "pdserve:store_keys") >= full_blocks
    assert total(m, "pdserve:store_get_hit_blocks_total") >= expected_hits // 16
    assert 0 < total(m, "pdserve:store_hit_ratio") <= 1
    assert total(m, "pdserve:store_live_nodes") == 2
    assert total(m, "pdserve:store_node_values") == total(m, "pdserve:store_keys")  # replication 1
    nodes = [scrape(p.metrics_url) for p in store_cluster.procs if p.name.startswith("kvstore-node")]
    assert sum(total(n, "pdserve:kv_transfer_bytes_received_total") for n in nodes) > 0  # puts landed
    assert sum(total(n, "pdserve:kv_transfer_bytes_sent_total") for n in nodes) > 0  # the load was served
    assert sum(total(n, "pdserve:store_pool_values") for n in nodes) >= full_blocks


def test_prompts_beyond_dram_come_back_from_ssd_with_identical_tokens(store_cluster):
    first_prompt = _prompt(300, seed=31)
    reference = asyncio.run(_complete(store_cluster.router_address, first_prompt)).token_ids
    nodes = [p for p in store_cluster.procs if p.name.startswith("kvstore-node")]
    for seed in (32, 33):  # 50 more blocks: the first prompt's blocks leave both nodes' 16-block DRAM tiers
        asyncio.run(_complete(store_cluster.router_address, _prompt(400, seed=seed)))

    async def demoted():
        return sum(total(scrape(p.metrics_url), "pdserve:store_tier_values", tier="ssd") for p in nodes) >= 18
    asyncio.run(wait_until(demoted, timeout_s=30, what="blocks demoted to the SSD tiers"))
    ssd_hits_before = sum(total(scrape(p.metrics_url), "pdserve:store_tier_hits_total", tier="ssd") for p in nodes)

    replace_prefill_worker(store_cluster)  # fresh local cache: the prompt must come from the store
    again = asyncio.run(_complete(store_cluster.router_address, first_prompt))
    assert again.token_ids == reference
    assert again.usage.cached_tokens == ((len(first_prompt) - 1) // 16) * 16
    after = [scrape(p.metrics_url) for p in nodes]
    assert sum(total(m, "pdserve:store_tier_hits_total", tier="ssd") for m in after) > ssd_hits_before
    assert sum(total(m, "pdserve:store_tier_promotions_total") for m in after) > 0
    assert sum(total(m, "pdserve:store_tier_corrupt_reads_total") for m in after) == 0


def test_store_node_killed_during_load_changes_nothing(store_cluster):
    prompts = [_prompt(n, seed=100 + i) for i, n in enumerate((90, 200, 150, 260, 120, 180))]
    reference = [asyncio.run(_complete(store_cluster.router_address, p)).token_ids for p in prompts]

    async def load_with_kill():
        async with Client(store_cluster.router_address) as client:
            tasks = [asyncio.create_task(client.complete(p, max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True,
                                                         timeout_s=60)) for p in prompts]
            await asyncio.sleep(0)  # the requests are in flight while the node dies
            store_cluster.kill("kvstore-node-0", signal.SIGKILL)
            return await asyncio.gather(*tasks)

    replace_prefill_worker(store_cluster)  # fresh local cache: these prompts must come from the store
    results = asyncio.run(load_with_kill())
    assert [r.token_ids for r in results] == reference
    assert all(r.finish_reason == "length" for r in results)

    async def node_declared_dead():
        stats = await _master_stats(store_cluster.store_address)
        return stats.num_dead_nodes >= 1
    asyncio.run(wait_until(node_declared_dead, timeout_s=30, what="master declares the killed node dead"))
    # new blocks are placed only on the surviving node
    asyncio.run(_complete(store_cluster.router_address, _prompt(320, seed=999)))

    async def placed_on_survivor_only():
        stats = await _master_stats(store_cluster.store_address)
        alive = [n for n in stats.nodes if n.node.node_id != "node-0"]
        return alive and all(n.num_values > 0 for n in alive) and all(
            n.num_values == 0 for n in stats.nodes if n.node.node_id == "node-0")
    asyncio.run(wait_until(placed_on_survivor_only, timeout_s=30, what="placement only on the survivor"))


def test_second_turn_reuses_the_whole_first_turn(store_cluster):
    """Decode publishes generated blocks (--store-publish-generated): a follow-up turn that repeats
    prompt + answer finds all of it in the store."""
    prompt = _prompt(100, seed=21)
    turn1 = asyncio.run(_complete(store_cluster.router_address, prompt))
    history = prompt + turn1.token_ids
    num_blocks = (len(history) - 1) // 16  # the last sampled token's KV is never computed

    async def published():
        return (await _master_stats(store_cluster.store_address)).num_keys >= num_blocks
    asyncio.run(wait_until(published, timeout_s=30, what="first turn published"))
    replace_prefill_worker(store_cluster)
    turn2 = asyncio.run(_complete(store_cluster.router_address, history + _prompt(40, seed=22)))
    assert turn2.usage.cached_tokens == num_blocks * 16


def test_local_prefill_on_decode_publishes_to_the_store(store_cluster):
    """A prompt prefilled on the decode worker itself (what the router does for short prompts) goes to
    the store too: a fresh prefill worker then loads it instead of computing it."""
    from pdserve.proto import pdserve_pb2 as pb
    from pdserve.proto import pdserve_pb2_grpc as pb_grpc

    prompt = _prompt(200, seed=41)
    decode = next(p for p in store_cluster.procs if p.name.startswith("decode") and p.alive())
    keys_before = asyncio.run(_master_stats(store_cluster.store_address)).num_keys

    async def decode_locally() -> list[int]:
        async with rpc.channel(decode.address) as ch:
            call = pb_grpc.DecodeWorkerStub(ch).Decode(pb.DecodeRequest(
                request_id="local-store-1", prompt_token_ids=prompt,
                sampling=pb.SamplingOptions(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)), timeout=60)
            return [t async for msg in call for t in msg.token_ids]
    local_tokens = asyncio.run(decode_locally())

    async def published():
        return (await _master_stats(store_cluster.store_address)).num_keys >= keys_before + len(prompt) // 16
    asyncio.run(wait_until(published, timeout_s=30, what="the local prefill's blocks published"))

    replace_prefill_worker(store_cluster)
    remote = asyncio.run(_complete(store_cluster.router_address, prompt))
    assert remote.token_ids == local_tokens
    assert remote.usage.cached_tokens == ((len(prompt) - 1) // 16) * 16
