"""Admission control against real router + prefill + decode processes on loopback: the in-flight
limit (`--max-inflight-requests`), the decode worker's KV pool (Reserve refused -> Overloaded) and
the TTFT SLO (`--ttft-slo-ms`), over gRPC (RESOURCE_EXHAUSTED) and HTTP (429 + Retry-After).

Every wait is bounded (call timeouts, `wait_until` deadlines); nothing asserts a timing.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import grpc
import pytest

from pdserve.client import Client
from pdserve.cluster import Cluster, ClusterSpec

from integration_helpers import all_blocks_free, start_cluster, wait_until

pytestmark = pytest.mark.timeout(180)

STARTUP_TIMEOUT_S = 90.0
CALL_TIMEOUT_S = 60.0  # per request; a request that hangs fails the test instead of stalling it
DRAIN_TIMEOUT_S = 30.0
MAX_INFLIGHT = 4
BURST = 20
DECODE_KV_BLOCKS = 24  # 16 tokens each: one long request (KV_HEAVY_MAX_TOKENS) fits, two do not
KV_HEAVY_MAX_TOKENS = 300  # 20-token prompt + 300 = 20 blocks
SLO_MS = 1000.0
SLO_PROMPT_LEN = 1500  # tokens; the router's initial estimate (0.1 ms/token) predicts 150 ms for one


def prompt(i: int, length: int = 20) -> list[int]:
    return [(100 + 7 * i + j) % 2000 + 3 for j in range(length)]


@pytest.fixture(scope="module")
def limited_cluster(tiny_model_dir) -> Cluster:
    """Every request through Reserve + remote prefill; at most 4 in flight; a small decode KV pool."""
    spec = ClusterSpec(model=str(tiny_model_dir), num_prefill=1, num_decode=1,
                       router_args=["--local-prefill-threshold", "0", "--health-interval-s", "0.2",
                                    "--max-inflight-requests", str(MAX_INFLIGHT)],
                       decode_args=["--num-kv-blocks", str(DECODE_KV_BLOCKS)])
    cluster = start_cluster(spec, timeout_s=STARTUP_TIMEOUT_S)
    try:
        yield cluster
    finally:
        cluster.stop()


async def grpc_attempt(client: Client, prompt_ids: list[int], max_tokens: int) -> tuple[str, object]:
    """("ok", token ids) or (status name, details) for one streamed greedy request."""
    token_ids: list[int] = []
    try:
        async for msg in client.generate(prompt_ids, max_tokens=max_tokens, temperature=0, ignore_eos=True,
                                         timeout_s=CALL_TIMEOUT_S):
            token_ids.extend(msg.token_ids)
            if msg.finish_reason:
                assert msg.finish_reason == "length", msg.finish_reason
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details()
    return "ok", token_ids


async def http_attempt(session: aiohttp.ClientSession, url: str, model: str, prompt_ids: list[int],
                       max_tokens: int) -> tuple[int, dict, object]:
    """(status, headers, body): the error JSON for a non-200, else the streamed finish reason."""
    body = {"model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        if resp.status != 200:
            return resp.status, dict(resp.headers), await resp.json()
        finish_reason = None
        async for line in resp.content:
            text = line.decode().strip()
            if text == "data: [DONE]":
                return 200, dict(resp.headers), finish_reason
            if text.startswith("data: "):
                chunk = json.loads(text[len("data: "):])
                assert "error" not in chunk, chunk
                finish_reason = chunk["choices"][0]["finish_reason"] or finish_reason
        return 200, dict(resp.headers), "no [DONE]"


async def drained(cluster: Cluster) -> None:
    async with Client(cluster.router_address) as client:
        await wait_until(lambda: all_blocks_free(client), timeout_s=DRAIN_TIMEOUT_S, what="all KV blocks free")


def test_inflight_limit_rejects_a_burst_over_grpc(limited_cluster):
    async def main():
        async with Client(limited_cluster.router_address) as client:
            outcomes = await asyncio.gather(*[grpc_attempt(client, prompt(i), 24) for i in range(BURST)])
            admitted = [(i, out) for i, (status, out) in enumerate(outcomes) if status == "ok"]
            rejected = [out for status, out in outcomes if status == "RESOURCE_EXHAUSTED"]
            assert len(admitted) + len(rejected) == BURST, outcomes
            assert admitted and rejected, outcomes
            assert all("retry later" in details for details in rejected), rejected
            assert any(f"limit {MAX_INFLIGHT}" in details for details in rejected), rejected
            for i, token_ids in admitted:  # the same greedy tokens as the request alone on the cluster
                assert await grpc_attempt(client, prompt(i), 24) == ("ok", token_ids)
        await drained(limited_cluster)

    asyncio.run(main())


def test_inflight_limit_rejects_a_burst_over_http_with_429(limited_cluster):
    async def main():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as session:
            async with session.get(f"{limited_cluster.http_url}/v1/models") as resp:
                model = (await resp.json())["data"][0]["id"]
            outcomes = await asyncio.gather(*[http_attempt(session, limited_cluster.http_url, model, prompt(i), 24)
                                              for i in range(BURST)])
        admitted = [out for status, _, out in outcomes if status == 200]
        rejected = [(headers, out) for status, headers, out in outcomes if status == 429]
        assert len(admitted) + len(rejected) == BURST, outcomes
        assert admitted and rejected, outcomes
        assert all(reason == "length" for reason in admitted), admitted
        for headers, body in rejected:
            assert int(headers["Retry-After"]) >= 1, headers
            assert body["error"]["type"] == "rate_limit_error", body
            assert "retry later" in body["error"]["message"], body
        await drained(limited_cluster)

    asyncio.run(main())


def test_reservations_beyond_the_kv_pool_are_rejected_not_queued(limited_cluster):
    async def main():
        async with Client(limited_cluster.router_address) as client:
            outcomes = await asyncio.wait_for(asyncio.gather(*[
                grpc_attempt(client, prompt(100 + i), KV_HEAVY_MAX_TOKENS) for i in range(MAX_INFLIGHT)]),
                CALL_TIMEOUT_S)
            completed = [out for status, out in outcomes if status == "ok"]
            rejected = [out for status, out in outcomes if status == "RESOURCE_EXHAUSTED"]
            assert len(completed) + len(rejected) == MAX_INFLIGHT, outcomes
            assert completed and rejected, outcomes  # one fits the pool; the others cannot all fit
            assert all(len(token_ids) == KV_HEAVY_MAX_TOKENS for token_ids in completed)
            assert all("KV blocks" in details and "retry later" in details for details in rejected), rejected
            await wait_until(lambda: all_blocks_free(client), timeout_s=DRAIN_TIMEOUT_S, what="all KV blocks free")
            # Once freed, the pool takes a long request again.
            status, token_ids = await grpc_attempt(client, prompt(200), KV_HEAVY_MAX_TOKENS)
            assert status == "ok" and len(token_ids) == KV_HEAVY_MAX_TOKENS, (status, token_ids)
            await wait_until(lambda: all_blocks_free(client), timeout_s=DRAIN_TIMEOUT_S, what="all KV blocks free")

    asyncio.run(main())


def test_ttft_slo_rejects_behind_a_backlog_then_admits_again(tiny_model_dir):
    spec = ClusterSpec(model=str(tiny_model_dir), num_prefill=1, num_decode=1,
                       router_args=["--local-prefill-threshold", "0", "--health-interval-s", "0.2",
                                    "--ttft-slo-ms", str(SLO_MS)])
    cluster = start_cluster(spec, timeout_s=STARTUP_TIMEOUT_S)
    try:
        async def main():
            async with Client(cluster.router_address) as client:
                # A burst of long prompts: the first few queue on the prefill worker; the prediction
                # for the rest (queued tokens x seconds per token) passes the SLO. 24 prompts: with the
                # paged-attention kernels the tiny model prefills ~2x faster than the router's initial
                # estimate, and 12 no longer always built a backlog past the SLO.
                outcomes = await asyncio.gather(*[
                    grpc_attempt(client, prompt(300 + i, SLO_PROMPT_LEN), 2) for i in range(24)])
                admitted = [out for status, out in outcomes if status == "ok"]
                rejected = [out for status, out in outcomes if status == "RESOURCE_EXHAUSTED"]
                assert len(admitted) + len(rejected) == len(outcomes), outcomes
                assert admitted and rejected, outcomes
                assert all("SLO" in details and "retry later" in details for details in rejected), rejected
                await wait_until(lambda: all_blocks_free(client), timeout_s=DRAIN_TIMEOUT_S,
                                 what="all KV blocks free")
                # The backlog is gone: a short prompt is admitted again ...
                status, out = await grpc_attempt(client, prompt(400, 16), 2)
                assert status == "ok", (status, out)
                # ... and so should a prompt as long as the rejected ones (retried a few times, bounded).
                last: list = []

                async def long_prompt_admitted() -> bool:
                    last[:] = await grpc_attempt(client, prompt(401, SLO_PROMPT_LEN), 2)
                    return last[0] == "ok"

                # The predictor learns compute seconds per token (queueing excluded), so once the
                # backlog is gone a long prompt is predicted fast again.
                await wait_until(long_prompt_admitted, timeout_s=30.0, interval_s=1.0,
                                 what=f"a long prompt admitted after the backlog drained (last: {last})")

        asyncio.run(main())
    finally:
        cluster.stop()
