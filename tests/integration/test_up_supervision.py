"""Kill tests through `pdserve up` itself (no test launcher): under a bounded load, `kill -9` a decode
worker, a prefill worker, a store node and the store master by the pids `pdserve up` started. Every
request completes with exactly the fault-free tokens, the supervisor starts the killed process again
(it re-registers and serves), the survivors end with every KV block free, and Ctrl-C still stops the
whole cluster cleanly.
"""

from __future__ import annotations

import asyncio
import os
import random

import grpc
import pytest

from integration_helpers import all_blocks_free, wait_until
from pdserve import rpc
from pdserve.client import Client
from pdserve.proto import kvstore_pb2 as kpb
from pdserve.proto import kvstore_pb2_grpc as kpb_grpc
from pdserve.up_process import UpProcess

NUM_WORKERS = 4
NUM_REQUESTS = 10  # per kill
MAX_TOKENS = 48
ROUTER_ARGS = "--local-prefill-threshold 0 --health-interval-s 0.2 --unhealthy-after 2 --max-retries 4"
WORKER_ARGS = ("--max-num-batched-tokens 32 --kv-cache-memory-mb 64 --reservation-timeout-s 10 "
               "--transfer-timeout-s 10")


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 2000) for _ in range(rng.randint(60, 300))] for _ in range(NUM_REQUESTS)]


@pytest.fixture(scope="module")
def up(tiny_model_dir, tmp_path_factory):
    proc = UpProcess(["--model", str(tiny_model_dir), "--prefill", "2", "--decode", "2", "--store-nodes", "2",
                      "--http-port", "-1", "--router-args", ROUTER_ARGS, "--worker-args", WORKER_ARGS,
                      "--restart-backoff-s", "0.2"],
                     log_dir=str(tmp_path_factory.mktemp("up")))
    proc.start()
    try:
        asyncio.run(proc.wait_ready(NUM_WORKERS))
        yield proc
    finally:
        procs = proc.processes()
        status = proc.stop()
        assert status == 0, proc.log_tail()
        for p in procs.values():  # Ctrl-C stopped every child
            with pytest.raises(ProcessLookupError):
                os.kill(p["pid"], 0)


async def _complete(client: Client, prompt: list[int]) -> list[int] | str:
    try:
        r = await client.complete(prompt, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, timeout_s=120)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return r.token_ids


async def _store_nodes(master: str) -> int:
    async with rpc.channel(master) as ch:
        try:
            stats = await kpb_grpc.KVStoreMasterStub(ch).Stats(kpb.MasterStatsRequest(), timeout=2.0)
        except grpc.aio.AioRpcError:
            return 0
        return len(stats.nodes)


@pytest.mark.parametrize("victim", ["decode-1", "prefill-0", "kvstore-node-1", "kvstore-master"])
def test_kill_under_load_through_pdserve_up(up, victim):
    async def main() -> None:
        prompts = _prompts(seed=len(victim))
        async with Client(up.address) as client:
            expected = [await _complete(client, p) for p in prompts]  # fault-free, before the kill
            assert all(isinstance(e, list) and len(e) == MAX_TOKENS for e in expected), expected
            restarts_before = up.processes()[victim]["restarts"]

            async def send(i: int) -> list[int] | str:
                await asyncio.sleep(0.3 * i)  # ~3 requests/s: several in flight when the kill lands
                return await _complete(client, prompts[i])

            load = [asyncio.create_task(send(i)) for i in range(NUM_REQUESTS)]
            await asyncio.sleep(1.0)
            old_pid = up.kill(victim)
            outputs = await asyncio.gather(*load)
            assert outputs == expected, f"kill -9 {victim}: {[o for o in outputs if isinstance(o, str)]}"

            record = await up.wait_restarted(victim, old_pid)
            assert record["restarts"] == restarts_before + 1
            if victim.startswith("kvstore"):
                master = up.state()["kvstore_master"]
                await wait_until(lambda: _count_nodes_is(master, 2), timeout_s=60, what="both store nodes back")
            await up.wait_ready(NUM_WORKERS, timeout_s=120)
            after = [await _complete(client, p) for p in prompts[:2]]  # the restarted process serves
            assert after == expected[:2]
            await wait_until(lambda: all_blocks_free(client), timeout_s=30, what="every KV block free")
        assert up.alive(), up.log_tail()
        assert f"{victim} (pid {old_pid}) was killed by SIGKILL" in up.log_tail(400)

    asyncio.run(main())


async def _count_nodes_is(master: str, n: int) -> bool:
    return await _store_nodes(master) == n
