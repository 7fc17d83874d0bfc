"""The router's OpenAI HTTP API, /metrics and /health against a real colocated cluster (router +
worker processes on loopback), driven by the official `openai` client; `pdserve bench` against
both front ends; and, once the UCX transfer layer exists, the same on a disaggregated cluster."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import aiohttp
import openai
import pytest

from integration_helpers import scrape, total
from pdserve.client import Client
from pdserve.cluster import Cluster, ClusterSpec

pytestmark = pytest.mark.timeout(180)

STARTUP_TIMEOUT_S = 60.0
POLL_TIMEOUT_S = 20.0
PROMPT_IDS = list(range(100, 140))  # 40 tokens: long enough for a remote prefill on a disaggregated cluster


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(ClusterSpec(num_prefill=0, num_decode=0, num_colocated=1))
    try:
        c.start(timeout_s=STARTUP_TIMEOUT_S)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def oai(cluster) -> openai.OpenAI:
    client = openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def model(oai) -> str:
    return oai.models.list().data[0].id


async def live_worker_stats(cluster: Cluster) -> list:
    """Each worker's Stats asked of the worker itself now (the router's ListWorkers view lags by a poll)."""
    from pdserve import rpc
    from pdserve.proto import pdserve_pb2 as pb
    from pdserve.proto import pdserve_pb2_grpc as pb_grpc

    out = []
    for p in cluster.procs:
        if p.name == "router":
            continue
        async with rpc.channel(p.address) as ch:
            stub = pb_grpc.PrefillWorkerStub(ch) if p.name.startswith("prefill") else pb_grpc.DecodeWorkerStub(ch)
            out.append(await stub.Stats(pb.StatsRequest(), timeout=5))
    return out


async def wait_all_blocks_free(cluster: Cluster) -> None:
    deadline = time.monotonic() + POLL_TIMEOUT_S
    while True:
        busy = [(s.worker_id, s.num_free_kv_blocks, s.num_kv_blocks, s.num_running, s.num_reserved_blocks)
                for s in await live_worker_stats(cluster)
                if s.num_free_kv_blocks != s.num_kv_blocks or s.num_running or s.num_reserved_blocks]
        if not busy:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"KV blocks still held after {POLL_TIMEOUT_S} s: {busy}")
        await asyncio.sleep(0.1)
    async with Client(cluster.router_address) as client:  # and the router's view agrees, one poll later
        while any(w.stats.num_free_kv_blocks != w.stats.num_kv_blocks for w in await client.workers()):
            assert time.monotonic() < deadline, "the router's ListWorkers still shows blocks in use"
            await asyncio.sleep(0.1)


# ---- the OpenAI API through the official client ----------------------------------------------

def test_models(oai, cluster):
    models = oai.models.list().data
    assert len(models) == 1 and models[0].object == "model"


def test_completion(oai, model):
    resp = oai.completions.create(model=model, prompt="def fibonacci(n):", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert resp.usage.completion_tokens == 8 and resp.usage.prompt_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 8
    assert resp.usage.prompt_tokens_details.cached_tokens >= 0


def test_completion_stream_with_usage(oai, model):
    chunks = list(oai.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=6, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == len(PROMPT_IDS)
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].text for c in chunks[:-1])
    whole = oai.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=6, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert text == whole.choices[0].text


def test_completion_logprobs(oai, model):
    resp = oai.completions.create(model=model, prompt="hello", max_tokens=5, temperature=0, logprobs=1,
                                  extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.text_offset) == 5
    assert all(x <= 0 for x in lp.token_logprobs)


def test_chat(oai, model):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}]
    resp = oai.chat.completions.create(model=model, messages=messages, max_completion_tokens=7, temperature=0,
                                       logprobs=True, extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert resp.usage.completion_tokens == 7 and len(choice.logprobs.content) == 7
    chunks = list(oai.chat.completions.create(model=model, messages=messages, max_tokens=7, temperature=0,
                                              stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 7 and chunks[-1].usage.prompt_tokens == resp.usage.prompt_tokens
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content


def test_unknown_model_is_404(oai):
    with pytest.raises(openai.NotFoundError) as info:
        oai.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


# ---- bad input: 400 with OpenAI's error JSON naming the field ---------------------------------

BAD_BODIES = [
    ("/v1/completions", b"{not json", "body"),
    ("/v1/completions", b"[1, 2]", "body"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
    ("/v1/completions", {"prompt": "x", "frobnicate": 1}, "frobnicate"),
    ("/v1/completions", {"prompt": "x", "temperature": -3}, "temperature"),
    ("/v1/completions", {"prompt": [1, 10**9]}, None),  # outside the vocabulary
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**6}, None),  # beyond the context
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
]


async def test_bad_inputs_are_400(cluster):
    async with aiohttp.ClientSession() as session:
        for path, body, param in BAD_BODIES:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            async with session.post(f"{cluster.http_url}{path}", data=data,
                                    headers={"Content-Type": "application/json"}) as resp:
                err = (await resp.json())["error"]
                assert resp.status == 400, (body, err)
                assert err["type"] == "invalid_request_error" and err["message"], err
                assert err["param"] == param, (body, err)
        async with session.get(f"{cluster.http_url}/v1/nothing") as resp:
            assert resp.status == 404 and "error" in await resp.json()
        async with session.get(f"{cluster.http_url}/v1/completions") as resp:
            assert resp.status == 405 and "error" in await resp.json()


async def test_health(cluster):
    async with aiohttp.ClientSession() as session, session.get(f"{cluster.http_url}/health") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "ok"


# ---- same tokens through both front ends ------------------------------------------------------

async def test_greedy_http_equals_grpc(cluster, oai, model):
    async with Client(cluster.router_address) as client:
        grpc_out = await client.complete(PROMPT_IDS, max_tokens=12, temperature=0, ignore_eos=True)
    http_out = await asyncio.to_thread(oai.completions.create, model=model, prompt=PROMPT_IDS, max_tokens=12,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert len(grpc_out.token_ids) == 12
    assert http_out.choices[0].text == grpc_out.text


# ---- a client that leaves mid-stream frees its KV blocks --------------------------------------

async def stream_then_disconnect(cluster: Cluster, prompt: list[int]) -> None:
    """Start a long stream, read a few chunks, check it holds KV blocks, drop the connection."""
    body = {"prompt": prompt, "max_tokens": 3000, "temperature": 0, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{cluster.http_url}/v1/completions", json=body)
        assert resp.status == 200
        num_chunks = 0
        async for line in resp.content:
            if line.startswith(b"data: {"):
                num_chunks += 1
                if num_chunks == 3:
                    break
        stats = await live_worker_stats(cluster)
        assert any(s.num_free_kv_blocks < s.num_kv_blocks and s.num_running for s in stats), stats
        resp.close()  # drops the connection with the generation far from done


async def test_disconnect_mid_stream_frees_blocks(cluster):
    before = scrape(f"{cluster.http_url}/metrics")
    await stream_then_disconnect(cluster, PROMPT_IDS)
    await wait_all_blocks_free(cluster)
    deadline = time.monotonic() + POLL_TIMEOUT_S
    while total(scrape(f"{cluster.http_url}/metrics"), "pdserve:request_success_total", finished_reason="abort") \
            <= total(before, "pdserve:request_success_total", finished_reason="abort"):
        assert time.monotonic() < deadline, "the aborted request was never counted"
        await asyncio.sleep(0.1)


# ---- metrics ----------------------------------------------------------------------------------

async def test_metrics_count_traffic(cluster, oai, model):
    url = f"{cluster.http_url}/metrics"
    before = scrape(url)
    await asyncio.to_thread(oai.completions.create, model=model, prompt="count me", max_tokens=4, temperature=0,
                            extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError):
        await asyncio.to_thread(oai.completions.create, model=model, prompt="x", max_tokens=4, n=2)
    async with Client(cluster.router_address) as client:  # gRPC traffic counts too
        await client.complete("count me too", max_tokens=4, temperature=0, ignore_eos=True)
    after = scrape(url)
    for name, grew_by in (("pdserve:request_success_total", 2), ("pdserve:generation_tokens_total", 8),
                          ("pdserve:time_to_first_token_seconds_count", 2),
                          ("pdserve:e2e_request_latency_seconds_count", 2),
                          ("pdserve:time_per_output_token_seconds_count", 2)):
        assert total(after, name) - total(before, name) >= grew_by, name
    assert total(after, "pdserve:prompt_tokens_total") > total(before, "pdserve:prompt_tokens_total")
    assert total(after, "pdserve:http_requests_total", status="400") > total(before, "pdserve:http_requests_total",
                                                                            status="400")
    assert total(after, "pdserve:num_requests_running") == 0
    assert total(after, "pdserve:worker_healthy") == 1
    assert total(after, "pdserve:num_kv_blocks") > 0  # the per-worker view from the registry's poll
    assert any(n == "pdserve:kv_cache_usage_perc" for n, _ in after)

    worker = next(p for p in cluster.procs if p.name.startswith("colocated"))
    samples = scrape(worker.metrics_url)
    assert total(samples, "pdserve:worker_generation_tokens_total") >= 4
    assert total(samples, "pdserve:num_kv_blocks") > 0
    assert total(samples, "pdserve:kv_transfer_bytes_sent_total") == 0  # colocated: nothing moves


# ---- pdserve bench against both front ends ----------------------------------------------------

@pytest.mark.parametrize("backend", ["openai-completions", "pdserve-grpc"])
def test_bench(cluster, backend, tmp_path):
    url = cluster.http_url if backend == "openai-completions" else f"grpc://{cluster.router_address}"
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pdserve", "bench", "--backend", backend, "--base-url", url, "--num-prompts", "10",
         "--random-input-len", "24", "--random-output-len", "6", "--max-duration-s", "60", "--no-progress",
         "--result-json", str(out)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "UCX_WARN_UNUSED_ENV_VARS": "n"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    s = result["summary"]
    assert s["num_sent"] == s["num_completed"] == 10 and s["num_failed"] == 0, s["errors"]
    assert s["total_output_tokens"] == 60 and s["total_input_tokens"] == 240
    assert s["latency"]["ttft"]["count"] == 10 and s["latency"]["e2e"]["count"] == 10
    assert len(result["requests"]) == 10 and result["config"]["backend"] == backend and result["model"]


def test_bench_prefix_hits_equal_the_routers_counters(cluster, tmp_path):
    """A small Mooncake-format replay: bench's cached tokens (from each response's usage) are exactly
    what the router counted, and the trace's unbounded ideal bounds the measured ratio from above (the
    worker's cache is shared with the module's other tests, so it may fall short of the ideal)."""
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps({"timestamp": 50 * i, "input_length": 512 * (i % 3 + 1) + 200,
                                            "output_length": 96, "hash_ids": [9000, *range(9001, 9003 + i % 3)]})
                                for i in range(8)))
    before = scrape(f"{cluster.http_url}/metrics")
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pdserve", "bench", "--base-url", cluster.http_url, "--dataset", "mooncake",
         "--trace", str(trace), "--time-scale", "0.1", "--max-concurrency", "1", "--ideal-lru-blocks", "2",
         "--max-duration-s", "60", "--no-progress", "--result-json", str(out)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "UCX_WARN_UNUSED_ENV_VARS": "n"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = scrape(f"{cluster.http_url}/metrics")
    hits = json.loads(out.read_text())["summary"]["prefix_hits"]
    assert hits["num_reporting"] == 8
    counted = total(after, "pdserve:prompt_tokens_cached_total") - total(before, "pdserve:prompt_tokens_cached_total")
    prompt = total(after, "pdserve:prompt_tokens_total") - total(before, "pdserve:prompt_tokens_total")
    assert (hits["cached_tokens"], hits["prompt_tokens"]) == (counted, prompt)
    assert hits["cached_tokens"] > 0 and 0 < hits["hit_ratio"] <= hits["ideal_unbounded"] + 1e-9
    assert "Prefix-hit ratio" in proc.stdout and "Trace ideal, unbounded cache" in proc.stdout


@pytest.mark.parametrize("which", ["cluster", "disagg_cluster"])
def test_bench_reports_local_and_remote_prefills_and_kv_bytes_as_the_router_counts_them(which, request, tmp_path):
    """pdserve bench over gRPC: the share of prompts prefilled locally vs remotely and the KV bytes moved
    (from each response) equal the router's own counters over the same run (colocated: all local, no
    bytes; disaggregated with every prompt remote: all remote, bytes moved)."""
    cluster = request.getfixturevalue(which)
    before = scrape(f"{cluster.http_url}/metrics")
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pdserve", "bench", "--base-url", f"grpc://{cluster.router_address}",
         "--backend", "pdserve-grpc", "--dataset", "random", "--num-prompts", "8", "--random-input-len", "256",
         "--random-range-ratio", "0.9", "--random-output-len", "4", "--max-concurrency", "1",
         "--max-duration-s", "60", "--no-progress", "--result-json", str(out)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "UCX_WARN_UNUSED_ENV_VARS": "n"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = scrape(f"{cluster.http_url}/metrics")
    routes = json.loads(out.read_text())["summary"]["prefill_routes"]

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)
    assert routes["num_reporting"] == 8
    assert (routes["num_local"], routes["num_remote"]) == (delta("pdserve:router_prefills_total", where="local"),
                                                           delta("pdserve:router_prefills_total", where="remote"))
    assert routes["kv_bytes_moved"] == delta("pdserve:router_kv_bytes_moved_total")
    assert routes["num_remote"] == (8 if which == "disagg_cluster" else 0)
    assert (routes["kv_bytes_moved"] > 0) == (which == "disagg_cluster")
    assert "Local prefill share" in proc.stdout and "KV bytes moved" in proc.stdout


# ---- a router with no workers -----------------------------------------------------------------

async def test_no_workers_is_503():
    from pdserve.router.config import RouterConfig
    from pdserve.router.server import RouterApp

    app = RouterApp(RouterConfig(port=0, http_port=0))
    await app.start()
    try:
        url = f"http://{app.http_address}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/health") as resp:
                assert resp.status == 503
            async with session.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}) as resp:
                assert resp.status == 503 and (await resp.json())["error"]["message"]
            async with session.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2,
                                                                   "stream": True}) as resp:
                assert resp.status == 503  # refused before any byte of the stream
    finally:
        await app.stop()


async def test_models_and_model_info_answer_only_once_a_worker_serves(cluster):
    """/v1/models and GetModelInfo are readiness probes, like /health: 503 / UNAVAILABLE while no
    decode-capable worker is healthy (a script that waits for them can send at once), 200 after."""
    import grpc

    from pdserve.cluster import free_port
    from pdserve.router.config import RouterConfig
    from pdserve.router.server import RouterApp

    worker = next(p for p in cluster.procs if p.name.startswith("colocated-"))
    app = RouterApp(RouterConfig(model=cluster.spec.model, port=0, http_port=0, health_interval_s=0.2,
                                 colocated_workers=f"127.0.0.1:{free_port()}"))  # nothing listens there
    await app.start()
    try:
        url = f"http://{app.http_address}"
        async with aiohttp.ClientSession() as session:
            for path in ("/v1/models", "/health"):
                async with session.get(f"{url}{path}") as resp:
                    assert resp.status == 503, path
            async with session.get(f"{url}/v1/models") as resp:
                assert "no healthy decode or colocated worker" in (await resp.json())["error"]["message"]
        async with Client(app.address) as client:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.model_info()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "not ready" in info.value.details()
    finally:
        await app.stop()

    app = RouterApp(RouterConfig(model=cluster.spec.model, port=0, http_port=0, health_interval_s=0.2,
                                 colocated_workers=worker.address))
    await app.start()
    try:
        url = f"http://{app.http_address}"
        deadline = time.monotonic() + POLL_TIMEOUT_S
        async with aiohttp.ClientSession() as session:
            while True:
                async with session.get(f"{url}/v1/models") as resp:
                    if resp.status == 200:
                        assert (await resp.json())["data"][0]["id"]
                        break
                    assert resp.status == 503
                assert time.monotonic() < deadline, "/v1/models never became ready"
                await asyncio.sleep(0.1)
            async with session.get(f"{url}/health") as resp:
                assert resp.status == 200
        async with Client(app.address) as client:
            assert (await client.model_info()).name
            # the first request after readiness is served, not refused
            r = await client.complete([5, 6, 7], max_tokens=2, temperature=0.0, ignore_eos=True, timeout_s=30)
            assert len(r.token_ids) == 2
    finally:
        await app.stop()


# ---- streaming: a chunk per token, only a cut character held back ------------------------------

async def test_stream_sends_a_chunk_per_token_holding_back_only_a_cut_character(cluster):
    """Sampled output of the tiny byte-level model often cuts a character between tokens. Over the
    real HTTP API, each engine output (a token, or several when the router lags) still gets its own SSE
    chunk at once; after each chunk the client has the text of the tokens so far but its cut tail, and
    the held-back bytes arrive with the token completing them."""
    from pdserve.engine.tokenizer import Tokenizer

    tok = Tokenizer(cluster.spec.model)
    prompt = "def fibonacci(n):"
    async with Client(cluster.router_address) as client:
        for seed in range(40):  # the same seed gives the same tokens through either front end
            r = await client.complete(prompt, max_tokens=12, temperature=1.0, seed=seed, ignore_eos=True,
                                      timeout_s=30)
            ids = list(r.token_ids)
            if any(tok.decode(ids[:k]).endswith("\ufffd") for k in range(1, len(ids))):
                break
        else:
            pytest.fail("no seed in 0..39 made a stream that cuts a character: the test would mean nothing")
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 1.0, "seed": seed, "ignore_eos": True,
            "stream": True}
    texts, finish = [], []
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{cluster.http_url}/v1/completions", json=body) as resp:
            assert resp.status == 200
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    texts.append(choice["text"])
                    finish.append(choice["finish_reason"])
    # A chunk per engine output: one token each while the router keeps up (several in one when it
    # lags, as vLLM's output collector does), never one chunk saved for the end.
    assert len(ids) == 12 and 2 <= len(texts) <= 12, texts
    assert finish[:-1] == [None] * (len(texts) - 1) and finish[-1] == "length"
    prefixes = {tok.decode(ids[:k]).rstrip("\ufffd") for k in range(1, len(ids) + 1)}
    for i in range(1, len(texts) + 1):
        # after each chunk the client holds the text of some prefix of the tokens but its cut tail
        assert "".join(texts[:i]) in prefixes, (i, texts)
    assert "".join(texts) == r.text == tok.decode(ids)


# ---- disaggregated (prefill + decode over UCX) ------------------------------------------------

@pytest.fixture(scope="module")
def disaggregated(cluster):
    c = Cluster(ClusterSpec(num_prefill=1, num_decode=1, router_args=["--local-prefill-threshold", "0"]))
    try:
        c.start(timeout_s=STARTUP_TIMEOUT_S)
        yield c
    finally:
        c.stop()


async def test_disaggregated_stream_matches_colocated(disaggregated, cluster, oai, model):
    disagg = openai.OpenAI(base_url=f"{disaggregated.http_url}/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        kwargs = dict(model=model, prompt=PROMPT_IDS, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
        chunks = await asyncio.to_thread(lambda: list(disagg.completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs)))
        colocated = await asyncio.to_thread(oai.completions.create, **kwargs)
    finally:
        disagg.close()
    assert chunks[-1].usage.completion_tokens == 10
    assert "".join(c.choices[0].text for c in chunks if c.choices) == colocated.choices[0].text
    samples = scrape(f"{disaggregated.http_url}/metrics")
    assert total(samples, "pdserve:router_prefills_total", where="remote") >= 1
    prefill = next(p for p in disaggregated.procs if p.name.startswith("prefill"))
    decode = next(p for p in disaggregated.procs if p.name.startswith("decode"))
    prefill_samples, decode_samples = scrape(prefill.metrics_url), scrape(decode.metrics_url)
    assert total(prefill_samples, "pdserve:kv_transfer_bytes_sent_total") > 0
    assert total(decode_samples, "pdserve:kv_transfer_bytes_received_total") > 0
    assert total(prefill_samples, "pdserve:kv_transfer_seconds_total") + \
        total(decode_samples, "pdserve:kv_transfer_seconds_total") > 0


async def test_disaggregated_disconnect_frees_blocks(disaggregated):
    await stream_then_disconnect(disaggregated, PROMPT_IDS)
    await wait_all_blocks_free(disaggregated)


async def test_disaggregated_request_timing_adds_up(disaggregated):
    """With return_timing the final message says where the request's time went: each hop's part is
    there (reserve, prefill queue and compute on the prefill worker, the KV tail, decode admission and
    steps on the decode worker), the parts add up to at most what the client waited, and the router's
    pdserve:request_phase_seconds histogram counted the request in every phase."""
    from pdserve.router.dispatch import PHASES

    before = scrape(f"{disaggregated.http_url}/metrics")
    async with Client(disaggregated.router_address) as client:
        t0 = time.monotonic()
        r = await client.complete(PROMPT_IDS, max_tokens=8, temperature=0, ignore_eos=True, return_timing=True)
        client_e2e_s = time.monotonic() - t0
        plain = await client.complete(PROMPT_IDS, max_tokens=8, temperature=0, ignore_eos=True)
    assert r.prefill_worker.startswith("prefill") and r.timing is not None and plain.timing is None
    parts = {name: getattr(r.timing, name) for name in PHASES}
    assert all(v >= 0 for v in parts.values()), parts
    for name in ("reserve_s", "prefill_compute_s", "decode_admission_s", "decode_s"):
        assert parts[name] > 0, (name, parts)
    assert sum(parts.values()) <= client_e2e_s, (parts, client_e2e_s)
    after = scrape(f"{disaggregated.http_url}/metrics")
    for name in PHASES:
        phase = name.removesuffix("_s")
        n = total(after, "pdserve:request_phase_seconds_count", phase=phase) - \
            total(before, "pdserve:request_phase_seconds_count", phase=phase)
        assert n == 2, (phase, n)


async def test_traced_router_serves_with_an_unreachable_collector(disaggregated):
    """A router with --trace-requests and an OTLP endpoint nobody listens on: requests are served as
    ever (export is in the background, spans dropped), and GET /debug/requests shows each one's hops."""
    from pdserve.cluster import free_port
    from pdserve.router.config import RouterConfig
    from pdserve.router.server import RouterApp

    prefill = next(p for p in disaggregated.procs if p.name.startswith("prefill"))
    decode = next(p for p in disaggregated.procs if p.name.startswith("decode"))
    app = RouterApp(RouterConfig(model=disaggregated.spec.model, port=0, http_port=0, health_interval_s=0.2,
                                 prefill_workers=prefill.address, decode_workers=decode.address,
                                 local_prefill_threshold=0, trace_requests=8,
                                 otlp_endpoint=f"127.0.0.1:{free_port()}"))
    await app.start()
    stopped_in_s = 0.0
    try:
        deadline = time.monotonic() + POLL_TIMEOUT_S
        while len(app.registry.healthy(1, 2)) < 2:  # PREFILL, DECODE
            assert time.monotonic() < deadline, "static workers never became healthy"
            await asyncio.sleep(0.1)
        async with Client(app.address) as client:
            for _ in range(3):
                r = await client.complete(PROMPT_IDS, max_tokens=4, temperature=0, ignore_eos=True, timeout_s=30)
                assert r.finish_reason == "length" and len(r.token_ids) == 4
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{app.http_address}/debug/requests") as resp:
                assert resp.status == 200
                traces = (await resp.json())["requests"]
    finally:
        t0 = time.monotonic()
        await app.stop()
        stopped_in_s = time.monotonic() - t0
    print(f"router with an unreachable collector stopped in {stopped_in_s:.1f} s")
    assert len(traces) == 3
    for t in traces:
        spans = {s["name"]: s for s in t["spans"]}
        assert {"reserve", "prefill_compute", "decode_admission", "decode"} <= set(spans), t
        assert spans["prefill_compute"]["worker"] == t["prefill_worker"] != t["decode_worker"]
        assert t["e2e_ms"] == pytest.approx(sum(s["duration_ms"] for s in t["spans"]), abs=0.01)


async def test_debug_requests_says_how_to_turn_tracing_on(cluster):
    async with aiohttp.ClientSession() as session, session.get(f"{cluster.http_url}/debug/requests") as resp:
        assert resp.status == 404 and "--trace-requests" in (await resp.json())["error"]["message"]
