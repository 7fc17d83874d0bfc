"""Fuzzing the front door (hypothesis, bounded): random JSON bodies for /v1/completions and
/v1/chat/completions and random GenerateRequest messages. Every answer is a 4xx with an OpenAI
error body carrying a message / INVALID_ARGUMENT with details, or a success; never a 500,
INTERNAL, UNKNOWN, crash or hang. Afterwards the cluster still serves and every block is free.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from integration_helpers import all_blocks_free, start_cluster, wait_until
from pdserve.client import Client
from pdserve.cluster import ClusterSpec
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

REQUEST_TIMEOUT_S = 20.0
MAX_TOKENS_LIMIT = 8  # bounds the work a body that happens to be valid can ask for
FUZZ = settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

SURROGATE_TEXT = st.text(st.characters(codec=None, exclude_categories=()) | st.sampled_from("\x00\ud800\udfff\ufeff"),
                         max_size=40)  # NUL, lone surrogates, BOM, control and private-use characters, ...
NUMBERS = (st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63, 2**64, 1e308, -0.0]))
SCALARS = st.none() | st.booleans() | NUMBERS | SURROGATE_TEXT
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(SURROGATE_TEXT, inner,
                                                                                           max_size=4), max_leaves=12)
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "seed", "stop", "stop_token_ids", "ignore_eos", "min_tokens", "stream", "stream_options", "logprobs",
          "top_logprobs", "n", "user", "logit_bias", "response_format", "echo", "best_of", "tools"]
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", ""]) | JSON},
                                optional={"content": SURROGATE_TEXT | JSON, "name": JSON})
FIELD_VALUE = {
    "prompt": SURROGATE_TEXT | st.lists(st.integers(-5, 3000), max_size=20) | JSON,
    "messages": st.lists(MESSAGE, max_size=3) | JSON,
    "max_tokens": st.integers(-3, MAX_TOKENS_LIMIT + 2) | JSON,
}
BODY = st.dictionaries(st.sampled_from(FIELDS) | SURROGATE_TEXT, JSON, max_size=6).flatmap(
    lambda d: st.fixed_dictionaries({k: FIELD_VALUE.get(k, JSON) for k in d}))
RAW = st.sampled_from([b"", b"{", b"null", b"[]", b"\xff\xfe", b'{"prompt": "a"' + b" " * 1000, b"[" * 100_000,
                       b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", b'{"prompt": "\\ud800", "max_tokens": 2}',
                       b'{"prompt": "a\\u0000b", "max_tokens": 2}', b'{"prompt": "a", "max_tokens": NaN}',
                       b'{"prompt": "a", "temperature": Infinity}', b'{"prompt": "a", "max_tokens": 1e999}',
                       b'{"prompt": "' + b"x" * 200_000 + b'", "max_tokens": 2}'])


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    spec = ClusterSpec(model=str(tiny_model_dir), num_prefill=0, num_decode=0, num_colocated=1,
                       router_args=["--health-interval-s", "0.2", "--max-tokens-limit", str(MAX_TOKENS_LIMIT)],
                       worker_args=["--kv-cache-memory-mb", "64"])
    c = start_cluster(spec)
    try:
        yield c
    finally:
        c.stop()


def _post(cluster, path: str, body: bytes) -> tuple[int, bytes, str]:
    host, port = cluster.http_url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("Content-Type", "")
    finally:
        conn.close()


def _check_http(status: int, data: bytes, content_type: str) -> None:
    assert status < 500, (status, data[:500])
    if status >= 400:
        err = json.loads(data)["error"]
        assert isinstance(err["message"], str) and err["message"], data[:500]
        return
    assert status == 200
    if content_type.startswith("text/event-stream"):
        events = [line[6:] for line in data.split(b"\n") if line.startswith(b"data: ")]
        assert events[-1] == b"[DONE]"
        for e in events[:-1]:
            assert "error" not in json.loads(e), e  # a valid body must not fail mid-stream
    else:
        assert json.loads(data)["choices"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_http_bodies(cluster, path):
    @FUZZ
    @given(body=BODY)
    def fuzz_json(body):
        _check_http(*_post(cluster, path, json.dumps(body, allow_nan=True).encode()))

    @settings(max_examples=14, deadline=None, derandomize=True)
    @given(raw=RAW)
    def fuzz_raw(raw):
        _check_http(*_post(cluster, path, raw))

    fuzz_json()
    fuzz_raw()


SAMPLING = st.builds(
    pb.SamplingOptions,
    max_tokens=st.integers(0, 2**32 - 1) | st.integers(0, MAX_TOKENS_LIMIT + 1),
    temperature=st.floats(width=32, allow_nan=True, allow_infinity=True),
    top_k=st.integers(-2**31, 2**31 - 1),
    top_p=st.floats(width=32, allow_nan=True, allow_infinity=True),
    seed=st.integers(0, 2**64 - 1),
    stop_token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=3),
    stop=st.lists(st.text(max_size=8), max_size=20),
    ignore_eos=st.booleans(), logprobs=st.booleans(),
    min_tokens=st.integers(0, 2**32 - 1) | st.integers(0, 4))
VALID_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)  # protobuf strings are valid UTF-8


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=draw(st.sampled_from(["", "fuzz"]) | VALID_TEXT.map(lambda t: t * 10)),
                             model=draw(st.sampled_from(["", "nope"]) | VALID_TEXT),
                             skip_detokenize=draw(st.booleans()))
    if draw(st.booleans()):
        req.text = draw(VALID_TEXT)
    else:
        req.token_ids.ids.extend(draw(st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 2100), max_size=20)))
    if draw(st.booleans()):
        req.sampling.CopyFrom(draw(SAMPLING))
    return req


def test_grpc_generate_requests(cluster):
    channel = grpc.insecure_channel(cluster.router_address)
    stub = pb_grpc.RouterStub(channel)
    counter = {"n": 0}

    @FUZZ
    @given(req=generate_requests())
    def fuzz(req):
        if req.request_id == "fuzz":
            counter["n"] += 1
            req.request_id = f"fuzz-{counter['n']}"  # ids must be unique among requests in flight
        try:
            for _ in stub.Generate(req, timeout=REQUEST_TIMEOUT_S):
                pass
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details(), req)
            assert exc.details()
    try:
        fuzz()
    finally:
        channel.close()


def test_cluster_still_serves_and_nothing_leaked(cluster):
    async def check():
        async with Client(cluster.router_address) as client:
            r = await client.complete("hello", max_tokens=4, temperature=0.0, ignore_eos=True, timeout_s=30)
            assert r.finish_reason == "length" and len(r.token_ids) == 4
            await wait_until(lambda: all_blocks_free(client), timeout_s=30, what="every block free")
            assert all(w.healthy for w in await client.workers())
    asyncio.run(check())
    assert math.isfinite(1.0)
