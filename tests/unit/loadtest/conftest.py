"""Fixtures of the loadtest tests: a word-level tokenizer.json, and a minimal OpenAI-compatible stub server for the harness's own tests (not a pdserve test).

It streams `max_tokens` SSE chunks with a small delay, then a usage chunk and [DONE]; it can
answer every n-th request with 503, and with `cache_block_size` it acts as an unbounded prefix
cache of whole blocks of token-id prompts and reports `prompt_tokens_details.cached_tokens`. It runs on its own event loop in a thread so that both
async tests and the synchronous CLI (which calls asyncio.run) can use it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from tokenizers import Tokenizer, models, pre_tokenizers

STUB_MODEL = "stub-model"


@dataclass
class StubBehaviour:
    token_delay_s: float = 0.002
    fail_every: int = 0  # every n-th completion request gets HTTP 503 (0: never)
    bodies: list[dict] = field(default_factory=list)  # request bodies received
    cache_block_size: int = 0  # > 0: report cached tokens as an unbounded cache of blocks this big
    cached_prefixes: set[tuple[int, ...]] = field(default_factory=set)


def cached_tokens(behaviour: StubBehaviour, prompt: list[int]) -> int:
    """Tokens of the longest cached whole-block prefix (the last token always computed); then cache it."""
    bs = behaviour.cache_block_size
    num_hit = 0
    while num_hit < (len(prompt) - 1) // bs and tuple(prompt[: (num_hit + 1) * bs]) in behaviour.cached_prefixes:
        num_hit += 1
    behaviour.cached_prefixes.update(tuple(prompt[: k * bs]) for k in range(1, len(prompt) // bs + 1))
    return num_hit * bs


def make_app(behaviour: StubBehaviour) -> web.Application:
    counter = itertools.count(1)

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": STUB_MODEL, "object": "model"}]})

    async def stream(request: web.Request, chat: bool) -> web.StreamResponse:
        body = await request.json()
        behaviour.bodies.append(body)
        if behaviour.fail_every and next(counter) % behaviour.fail_every == 0:
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        if chat:
            prompt_tokens = len(body["messages"][0]["content"].split())
        else:
            prompt = body["prompt"]
            prompt_tokens = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(payload: dict) -> None:
            await resp.write(f"data: {json.dumps(payload)}\n\n".encode())

        if chat:
            await send({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        num_tokens = body["max_tokens"]
        for i in range(num_tokens):
            await asyncio.sleep(behaviour.token_delay_s)
            choice = {"index": 0, "delta": {"content": f"t{i} "}} if chat else {"index": 0, "text": f"t{i} "}
            await send({"choices": [choice]})
        usage: dict = {"prompt_tokens": prompt_tokens, "completion_tokens": num_tokens}
        if behaviour.cache_block_size and not chat and isinstance(body["prompt"], list):
            usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens(behaviour, body["prompt"])}
        await send({"choices": [], "usage": usage})
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", lambda r: stream(r, chat=False))
    app.router.add_post("/v1/chat/completions", lambda r: stream(r, chat=True))
    return app


class StubServer:
    def __init__(self, behaviour: StubBehaviour) -> None:
        self.behaviour = behaviour
        self.base_url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="stub-openai", daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)

    async def _start(self) -> None:
        self._runner = web.AppRunner(make_app(self.behaviour), shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.base_url = f"http://{host}:{port}"

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@pytest.fixture
def stub_behaviour(request: pytest.FixtureRequest) -> StubBehaviour:
    """Override per test: @pytest.mark.parametrize("stub_behaviour", [{"fail_every": 3}], indirect=True)."""
    return StubBehaviour(**getattr(request, "param", {}))


@pytest.fixture
def stub_server(stub_behaviour: StubBehaviour) -> Iterator[StubServer]:
    server = StubServer(stub_behaviour)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def word_tokenizer_dir(tmp_path: Path) -> Path:
    """A word-level tokenizer.json: [UNK]=0, <s>=1 (special), then w0..w199, t0..t99 (the stub's output words)."""
    vocab = {"[UNK]": 0, "<s>": 1}
    for word in [f"w{i}" for i in range(200)] + [f"t{i}" for i in range(100)]:
        vocab[word] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["[UNK]", "<s>"])
    directory = tmp_path / "word_tokenizer"
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory
