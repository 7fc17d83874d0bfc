"""Soak: a bounded burst of concurrent requests that end every way a request can end (finish,
client cancel, short deadline, Abort RPC, HTTP streaming client that disconnects) against the
disaggregated cluster; afterwards no worker holds a block, a reservation or a request, and the
router has nothing in flight. Seeded, so a failure replays.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import urllib.request

import aiohttp
import grpc

from integration_helpers import all_blocks_free, wait_until
from pdserve.client import Client

NUM_REQUESTS = 90
MAX_CONCURRENCY = 12
SOAK_TIMEOUT_S = 60.0
SEED = 20240607
KINDS = ("finish", "cancel", "deadline", "abort", "http_disconnect", "http_finish")

# What each kind may end in; anything else (INTERNAL, UNKNOWN, a 500) fails the test.
ALLOWED = {
    "finish": {"length", "stop"},
    "cancel": {"cancelled"},
    "deadline": {"DEADLINE_EXCEEDED", "length"},
    "abort": {"abort", "length"},
    "http_disconnect": {"disconnected", "200"},
    "http_finish": {"200"},
}
ALWAYS_ALLOWED = {"RESOURCE_EXHAUSTED", "429"}  # admission control may refuse under the burst


def router_running(http_url: str) -> float:
    text = urllib.request.urlopen(f"{http_url}/metrics", timeout=5).read().decode()
    return sum(float(v) for v in re.findall(r"^pdserve:num_requests_running\{[^}]*\} (\S+)$", text, re.M))


def _prompt(rng: random.Random) -> list[int]:
    return [rng.randrange(10, 2000) for _ in range(rng.choice((8, 40, 90, 200)))]


async def _grpc_request(client: Client, kind: str, i: int, rng: random.Random) -> str:
    prompt = _prompt(rng)
    req_id = f"soak-{i}"
    cut_after = rng.randrange(1, 6)
    max_tokens = rng.randrange(4, 24) if kind == "finish" else 400
    timeout_s = rng.uniform(0.1, 1.0) if kind == "deadline" else 30.0
    got = 0
    outcome = ""
    stream = client.generate(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, request_id=req_id,
                             timeout_s=timeout_s)
    try:
        async for msg in stream:
            got += len(msg.token_ids)
            if msg.finish_reason:
                outcome = msg.finish_reason
            if kind == "cancel" and got >= cut_after:
                return "cancelled"
            if kind == "abort" and got >= cut_after and not outcome:
                await client.abort(req_id)  # may race the finish: then found is False, which is fine
                kind = "aborted"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    finally:
        await stream.aclose()
    return outcome or "no finish reason"


async def _http_request(session: aiohttp.ClientSession, http_url: str, kind: str, rng: random.Random) -> str:
    chat = rng.random() < 0.5
    stream = kind == "http_disconnect" or rng.random() < 0.5
    body = {"max_tokens": 400 if kind == "http_disconnect" else rng.randrange(4, 16), "temperature": 0,
            "ignore_eos": True, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": "tell me about " + "x" * rng.randrange(1, 200)}]
    else:
        body["prompt"] = _prompt(rng)
    url = f"{http_url}/v1/{'chat/completions' if chat else 'completions'}"
    async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=30)) as resp:
        if resp.status != 200:
            return str(resp.status)
        if kind == "http_disconnect":
            for _ in range(rng.randrange(1, 5)):
                line = await resp.content.readline()
                if not line or b"[DONE]" in line:
                    return "200"
            resp.close()  # drop the connection mid-stream
            return "disconnected"
        if stream:
            async for line in resp.content:
                if line.startswith(b"data: {") and b'"error"' in line and json.loads(line[6:]).get("error"):
                    return "stream error: " + line.decode()
        else:
            await resp.json()
        return "200"


async def test_soak_ends_with_nothing_leaked(disagg_cluster):
    rng = random.Random(SEED)
    plan = [(i, rng.choice(KINDS), random.Random(rng.getrandbits(32))) for i in range(NUM_REQUESTS)]
    limit = asyncio.Semaphore(MAX_CONCURRENCY)
    outcomes: dict[str, dict[str, int]] = {k: {} for k in KINDS}
    async with Client(disagg_cluster.router_address) as client, aiohttp.ClientSession() as session:
        async def one(i: int, kind: str, r: random.Random) -> None:
            async with limit:
                await asyncio.sleep(r.uniform(0, 0.05))
                if kind.startswith("http"):
                    outcome = await _http_request(session, disagg_cluster.http_url, kind, r)
                else:
                    outcome = await _grpc_request(client, kind, i, r)
            outcomes[kind][outcome] = outcomes[kind].get(outcome, 0) + 1

        t0 = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(one(*p) for p in plan)), SOAK_TIMEOUT_S)
        elapsed = time.monotonic() - t0
        bad = {kind: {o: n for o, n in seen.items() if o not in ALLOWED[kind] | ALWAYS_ALLOWED}
               for kind, seen in outcomes.items()}
        assert not any(bad.values()), f"unexpected outcomes: {bad} (all: {outcomes})"
        assert sum(n for seen in outcomes.values() for n in seen.values()) == NUM_REQUESTS
        # most requests were really served, not refused
        assert sum(n for seen in outcomes.values() for o, n in seen.items() if o in ALWAYS_ALLOWED) < NUM_REQUESTS // 4

        await wait_until(lambda: all_blocks_free(client), timeout_s=30, what="every worker holds no block")
        workers = await client.workers()
        assert len(workers) == 4 and all(w.healthy for w in workers)

        async def router_idle():
            return router_running(disagg_cluster.http_url) == 0
        await wait_until(router_idle, timeout_s=10, what="router has no request in flight")
        # the cluster still serves after the soak
        r = await client.complete([5, 6, 7, 8], max_tokens=4, temperature=0.0, ignore_eos=True, timeout_s=30)
        assert r.finish_reason == "length"
        print(f"soak: {NUM_REQUESTS} requests in {elapsed:.1f} s: {outcomes}")
