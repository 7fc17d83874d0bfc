"""router/http_api.py in-process, over a stand-in Dispatcher: typed errors become the right HTTP
status (429 with Retry-After, 503), a failure mid-stream is reported in-band, and a client that
disconnects closes the dispatcher stream."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import aiohttp
import pytest

from pdserve.errors import Overloaded, PeerUnavailable
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.dispatch import Event
from pdserve.router.http_api import HttpApi
from pdserve.router.metrics import RouterMetrics


class FakeTokenizer:
    bos_token = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        return "".join(m["content"] for m in messages)


class FakeDispatcher:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.meta = SimpleNamespace(name="m", max_model_len=1000)
        self.tokenizer = FakeTokenizer()
        self.closed = asyncio.Event()
        self.started = asyncio.Event()

    def prepare(self, prompt_text, prompt_ids, params, model: str = "") -> list[int]:
        return prompt_ids or self.tokenizer.encode(prompt_text)

    async def generate(self, prompt_ids, params, **kwargs):
        try:
            if self.mode == "overloaded":
                raise Overloaded("no KV blocks free", retry_after_s=2.5)
            if self.mode == "unavailable":
                raise PeerUnavailable("no healthy decode or colocated worker is available")
            self.started.set()
            yield Event(token_ids=[104], text="h")
            if self.mode == "fail":
                raise PeerUnavailable("decode worker died")
            while True:  # "forever": only a disconnect ends it
                await asyncio.sleep(0.01)
                yield Event(token_ids=[105], text="i")
        finally:
            self.closed.set()


@pytest.fixture
async def serve():
    apis: list[HttpApi] = []

    async def start(mode: str) -> tuple[str, FakeDispatcher]:
        dispatcher = FakeDispatcher(mode)
        registry = SimpleNamespace(healthy=lambda *roles: [],
                                   unready_reason=lambda: "no healthy decode or colocated worker")
        api = HttpApi(dispatcher, registry, RouterMetrics("m"))  # type: ignore[arg-type]
        await api.start("127.0.0.1", 0)
        apis.append(api)
        return f"http://{api.address}", dispatcher

    yield start
    for api in apis:
        await api.stop()


@pytest.mark.parametrize("stream", [False, True])
async def test_overloaded_is_429_with_retry_after(serve, stream):
    url, _ = await serve("overloaded")
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/completions",
                                                    json={"prompt": "hi", "stream": stream}) as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "3"
        assert (await resp.json())["error"]["type"] == "rate_limit_error"


async def test_no_worker_is_503(serve):
    url, _ = await serve("unavailable")
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}) as r:
            assert r.status == 503 and "no healthy" in (await r.json())["error"]["message"]
        for path in ("/health", "/v1/models"):
            async with s.get(f"{url}{path}") as r:
                assert r.status == 503


async def test_failure_mid_stream_is_an_error_chunk(serve):
    url, dispatcher = await serve("fail")
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/completions",
                                                    json={"prompt": "hi", "stream": True}) as resp:
        assert resp.status == 200
        events = [line[6:].strip() for line in (await resp.text()).splitlines() if line.startswith("data: ")]
    assert json.loads(events[0])["choices"][0]["text"] == "h"
    assert json.loads(events[1])["error"]["message"] == "decode worker died"
    assert events[-1] == "[DONE]"
    assert dispatcher.closed.is_set()


async def test_disconnect_mid_stream_closes_the_dispatcher_stream(serve):
    url, dispatcher = await serve("forever")
    async with aiohttp.ClientSession() as s:
        resp = await s.post(f"{url}/v1/completions", json={"prompt": "hi", "stream": True})
        assert resp.status == 200
        await resp.content.readline()
        resp.close()
    await asyncio.wait_for(dispatcher.closed.wait(), 10)


async def test_disconnect_while_waiting_for_a_whole_response_closes_the_stream(serve):
    url, dispatcher = await serve("forever")
    async with aiohttp.ClientSession() as s:
        call = asyncio.create_task(s.post(f"{url}/v1/completions", json={"prompt": "hi"}))
        await asyncio.wait_for(dispatcher.started.wait(), 10)
        call.cancel()  # the client gives up: its connection closes
        with pytest.raises(asyncio.CancelledError):
            await call
    await asyncio.wait_for(dispatcher.closed.wait(), 10)


async def test_usage_in_whole_response(serve):
    url, dispatcher = await serve("fail")
    dispatcher.mode = "one"

    async def one(prompt_ids, params, **kwargs):
        yield Event(token_ids=[104, 105], text="hi", logprobs=[-0.5, -0.25], finish_reason="stop",
                    usage=pb.Usage(prompt_tokens=2, completion_tokens=2, cached_tokens=0))

    dispatcher.generate = one
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/completions",
                                                    json={"prompt": "hi", "logprobs": 0}) as resp:
        body = await resp.json()
    assert body["choices"][0]["text"] == "hi" and body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["logprobs"]["tokens"] == ["h", "i"]
    assert body["usage"]["total_tokens"] == 4
