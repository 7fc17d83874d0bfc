"""Run-time role switching (pdserve/worker_roles.py) with real processes: a worker drains (a switch to
colocated needs none), switches, and the router routes by its new role at once; requests in flight across a switch all finish; a bad
role or a second concurrent switch is refused."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from integration_helpers import start_cluster, wait_until
from pdserve import rpc
from pdserve.client import Client
from pdserve.cluster import ClusterSpec
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    spec = ClusterSpec(model=str(tiny_model_dir), num_prefill=1, num_decode=1,
                       router_args=["--local-prefill-threshold", "0", "--health-interval-s", "0.2"],
                       worker_args=["--kv-cache-memory-mb", "64", "--max-num-batched-tokens", "64"])
    c = start_cluster(spec)
    try:
        yield c
    finally:
        c.stop()


async def set_role(address: str, role: int, **kwargs) -> pb.SetRoleResponse:
    async with rpc.channel(address) as ch:
        return await pb_grpc.WorkerControlStub(ch).SetRole(pb.SetRoleRequest(role=role, **kwargs), timeout=60)


async def roles(client: Client) -> dict[str, int]:
    return {w.address: w.role for w in await client.workers(refresh=True) if w.healthy}


async def test_switch_while_requests_stream_keeps_every_request(cluster):
    prompt = list(range(1, 200))  # several 64-token chunks: the prefill is in flight when the switch begins
    async with Client(cluster.router_address) as client:
        before = await roles(client)
        prefill = next(a for a, r in before.items() if r == pb.PREFILL)
        decode = next(a for a, r in before.items() if r == pb.DECODE)
        reference = (await client.complete(prompt, max_tokens=24, temperature=0.0, ignore_eos=True)).token_ids

        async def one():
            return (await client.complete(prompt, max_tokens=24, temperature=0.0, ignore_eos=True,
                                          timeout_s=120)).token_ids
        load = [asyncio.create_task(one()) for _ in range(6)]
        await asyncio.sleep(0.05)
        # widening (prefill -> colocated): no drain; the prefills it holds carry on and finish (below, in parity)
        resp = await set_role(prefill, pb.COLOCATED, reason="test")
        assert (resp.previous_role, resp.role) == (pb.PREFILL, pb.COLOCATED)
        assert resp.num_drained == 0 and resp.drain_seconds == 0.0
        # the router learnt the new role at once (re-registration), not at a later poll
        await wait_until(lambda: _role_is(client, prefill, pb.COLOCATED), timeout_s=5, what="router sees colocated")
        # new requests now go to both decode-capable workers, and every old one finished, in parity
        more = [asyncio.create_task(one()) for _ in range(4)]
        outs = await asyncio.gather(*load, *more)
        assert all(o == reference for o in outs)

        resp = await set_role(decode, pb.PREFILL, reason="test")
        assert resp.previous_role == pb.DECODE
        await wait_until(lambda: _role_is(client, decode, pb.PREFILL), timeout_s=5, what="router sees prefill")
        assert (await one()) == reference  # now prefilled on the old decode worker, decoded on the old prefill one
        await set_role(decode, pb.DECODE)
        await set_role(prefill, pb.PREFILL)
        await wait_until(lambda: _role_is(client, prefill, pb.PREFILL), timeout_s=5, what="roles restored")
        stats = {w.address: w.stats for w in await client.workers(refresh=True)}
        assert stats[prefill].num_role_switches == 2 and not stats[prefill].draining


async def _role_is(client: Client, address: str, role: int) -> bool:
    return (await roles(client)).get(address) == role


async def test_bad_role_and_concurrent_switch_are_refused(cluster):
    async with Client(cluster.router_address) as client:
        decode = next(a for a, r in (await roles(client)).items() if r == pb.DECODE)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await set_role(decode, pb.WORKER_ROLE_UNSPECIFIED)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "role" in err.value.details()
        same = await set_role(decode, pb.DECODE)  # no-op: nothing drained
        assert same.num_drained == 0 and same.role == pb.DECODE

        # a long generation holds the drain; a second switch meanwhile is refused, the first then completes
        long_req = asyncio.create_task(client.complete(list(range(1, 40)), max_tokens=200, temperature=0.0,
                                                       ignore_eos=True, timeout_s=120))
        await wait_until(lambda: _busy(client, decode), timeout_s=20, what="decode busy")
        first = asyncio.create_task(set_role(decode, pb.PREFILL))  # narrowing: drains
        await asyncio.sleep(0.2)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await set_role(decode, pb.COLOCATED)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "already switching" in err.value.details()
        assert len((await long_req).token_ids) == 200  # the drain waited for it: nothing lost
        done = await first
        assert done.role == pb.PREFILL and done.num_drained >= 1 and done.drain_seconds > 0
        await set_role(decode, pb.DECODE)


async def _busy(client: Client, address: str) -> bool:
    return any(w.address == address and w.stats.num_running for w in await client.workers(refresh=True))
