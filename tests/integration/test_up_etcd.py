"""`pdserve up --etcd --routers 2 --store-masters 2` as users start it: etcd is a real process,
workers, store nodes and masters register under leases, routers learn the workers by watching.
Under a bounded load it `kill -9`s the leading store master (a standby leads, rebuilt from the
nodes' inventories, and no request fails), a router replica (only requests streaming through it
fail, at once with UNAVAILABLE; every later request completes through the other), and etcd itself
(serving goes on; after its restart everyone is registered again). Outputs always equal the
fault-free run's; every KV block ends free.
"""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from integration_helpers import all_blocks_free, wait_until
from pdserve import rpc
from pdserve.client import Client
from pdserve.membership import Etcd, EtcdConfig
from pdserve.proto import kvstore_pb2 as kpb
from pdserve.proto import kvstore_pb2_grpc as kpb_grpc
from pdserve.up_process import UpProcess

NUM_WORKERS = 2
NUM_REQUESTS = 8
MAX_TOKENS = 32
ROUTER_ARGS = "--local-prefill-threshold 0 --health-interval-s 0.2 --unhealthy-after 2 --max-retries 4"
WORKER_ARGS = "--max-num-batched-tokens 32 --kv-cache-memory-mb 64 --transfer-timeout-s 10"


@pytest.fixture(scope="module")
def up(etcd_binary, tiny_model_dir, tmp_path_factory):
    proc = UpProcess(["--model", str(tiny_model_dir), "--etcd", "--routers", "2", "--store-masters", "2",
                      "--prefill", "1", "--decode", "1", "--store-nodes", "1", "--store-memory-mb", "64",
                      "--http-port", "-1", "--router-args", ROUTER_ARGS, "--worker-args", WORKER_ARGS,
                      "--restart-backoff-s", "0.2"],
                     log_dir=str(tmp_path_factory.mktemp("up-etcd")))
    proc.start()
    try:
        asyncio.run(proc.wait_ready(NUM_WORKERS))
        asyncio.run(_all_routers_ready(proc))
        yield proc
    finally:
        assert proc.stop() == 0, proc.log_tail()


def _routers(up: UpProcess) -> str:
    return up.state()["router"]


async def _all_routers_ready(up: UpProcess) -> None:
    for address in _routers(up).split(","):
        await up.wait_ready(NUM_WORKERS, router=address)


def _prompts(seed: int, shared_prefix: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [shared_prefix + [rng.randrange(10, 2000) for _ in range(rng.randint(20, 80))]
            for _ in range(NUM_REQUESTS)]


async def _complete(client: Client, prompt: list[int]) -> list[int] | str:
    try:
        r = await client.complete(prompt, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, timeout_s=120)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return r.token_ids


async def _leader_stats(masters: str) -> kpb.MasterStats | None:
    async with rpc.channel(masters) as ch:
        try:
            return await kpb_grpc.KVStoreMasterStub(ch).Stats(kpb.MasterStatsRequest(), timeout=2.0)
        except grpc.aio.AioRpcError:
            return None


async def _etcd_keys(up: UpProcess, prefix: str) -> list[str]:
    etcd = Etcd(EtcdConfig(etcd=up.processes()["etcd"]["address"]))
    try:
        return [kv.key.decode() for kv in await etcd.client.get_prefix(f"/pdserve/{prefix}".encode())]
    finally:
        await etcd.close()


async def _leader_name(up: UpProcess) -> str:
    etcd = Etcd(EtcdConfig(etcd=up.processes()["etcd"]["address"]))
    try:
        got = await etcd.client.get(b"/pdserve/kvstore/leader")
    finally:
        await etcd.close()
    address = got.value.decode()
    return next(n for n, p in up.processes().items() if n.startswith("kvstore-master") and p["address"] == address)


async def _load_with_kill(up: UpProcess, victim: str, prompts: list[list[int]], client: Client,
                          ) -> tuple[list, int, float, list[float]]:
    """Send the prompts ~3/s, kill -9 `victim` after 1 s; (outputs, killed pid, kill time, send times)."""
    loop = asyncio.get_running_loop()
    sent_at: list[float] = [0.0] * len(prompts)

    async def send(i: int):
        await asyncio.sleep(0.3 * i)
        sent_at[i] = loop.time()
        return await _complete(client, prompts[i])

    load = [asyncio.create_task(send(i)) for i in range(len(prompts))]
    await asyncio.sleep(1.0)
    killed_at = loop.time()
    pid = up.kill(victim)
    outputs = await asyncio.gather(*load)
    return outputs, pid, killed_at, sent_at


def test_kill_the_leading_store_master(up):
    async def main() -> None:
        prefix = [7 + i % 1900 for i in range(64)]  # 4 shared blocks: the store holds them
        prompts = _prompts(1, prefix)
        masters = up.state()["kvstore_master"]
        async with Client(_routers(up)) as client:
            expected = [await _complete(client, p) for p in prompts]
            before = await wait_until(lambda: _leader_stats(masters), what="a leader")
            assert before.num_keys > 0
            leader = await _leader_name(up)
            outputs, pid, _, _ = await _load_with_kill(up, leader, prompts, client)
            assert outputs == expected  # no request failed, none changed
            # A leader again (the standby, or the restarted one), rebuilt from the node's inventory.
            after = await wait_until(lambda: _stats_with_keys(masters, before.num_keys), timeout_s=60,
                                     what="a leader with the stored keys back")
            assert after.num_keys >= before.num_keys
            await up.wait_restarted(leader, pid)
            await wait_until(lambda: all_blocks_free(client), timeout_s=30, what="every KV block free")

    asyncio.run(main())


async def _stats_with_keys(masters: str, num_keys: int) -> kpb.MasterStats | None:
    stats = await _leader_stats(masters)
    return stats if stats is not None and stats.num_keys >= num_keys else None


def test_kill_a_router_replica(up):
    async def main() -> None:
        prompts = _prompts(2, [])
        async with Client(_routers(up)) as client:
            expected = [await _complete(client, p) for p in prompts]
            outputs, pid, killed_at, sent_at = await _load_with_kill(up, "router-0", prompts, client)
            for out, exp, t in zip(outputs, expected, sent_at):
                if isinstance(out, str):  # only a request streaming through the killed router may fail
                    assert out == "UNAVAILABLE" and t < killed_at, (out, t, killed_at)
                else:
                    assert out == exp
            assert sum(isinstance(o, list) for o in outputs) >= sum(t > killed_at for t in sent_at)
            await up.wait_restarted("router-0", pid)
            await _all_routers_ready(up)  # router-0 learnt every worker from etcd again
            assert [await _complete(client, p) for p in prompts[:2]] == expected[:2]

    asyncio.run(main())


def test_kill_etcd(up):
    async def main() -> None:
        prompts = _prompts(3, [])
        async with Client(_routers(up)) as client:
            expected = [await _complete(client, p) for p in prompts]
            outputs, pid, _, _ = await _load_with_kill(up, "etcd", prompts, client)
            assert outputs == expected  # etcd is off the data path: nothing fails while it is down
            await up.wait_restarted("etcd", pid)
            # Everyone is registered again: 2 workers, 1 node, 2 masters, and a leader.
            await wait_until(lambda: _keys_are(up, "workers/", 2), timeout_s=60, what="workers back in etcd")
            await wait_until(lambda: _keys_are(up, "kvstore/masters/", 2), timeout_s=60, what="masters in etcd")
            await wait_until(lambda: _keys_are(up, "kvstore/nodes/", 1), timeout_s=60, what="node in etcd")
            await wait_until(lambda: _leader_stats(up.state()["kvstore_master"]), timeout_s=60,
                             what="a leading store master again")
            await _all_routers_ready(up)
            assert [await _complete(client, p) for p in prompts[:2]] == expected[:2]
            await wait_until(lambda: all_blocks_free(client), timeout_s=30, what="every KV block free")

    asyncio.run(main())


async def _keys_are(up: UpProcess, prefix: str, n: int) -> bool:
    try:
        return len(await _etcd_keys(up, prefix)) == n
    except Exception:  # noqa: BLE001 - etcd still starting
        return False
