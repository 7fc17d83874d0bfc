"""AsyncEngine: runs an LLMEngine on its own thread and serves asyncio callers.

The forward pass owns one dedicated thread (STYLE rule 5). Every engine mutation (adding,
aborting, reserving) is a command run on that thread between steps, so the engine needs no
locks; results come back through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from pdserve.engine.llm_engine import LLMEngine, RequestOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sequence import Sequence

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The engine thread shares the GIL with the process's serving threads (the event loop, gRPC's poller). It
# drops the GIL for every torch op and must take it back afterwards; while another thread runs Python, that
# waits until the holder is forced to switch, after Python's default 5 ms. A shorter interval bounds the
# stall per op (measured: tiny, 60 prompts at once, colocated: +4-8 % output tok/s; docs/benchmarks.md).
GIL_SWITCH_INTERVAL_S = 0.0005


def _set_result(fut: asyncio.Future, value: object) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def merge_outputs(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """One output holding `a` then `b` (consecutive outputs of one request)."""
    logprobs = None if a.new_logprobs is None and b.new_logprobs is None else \
        (a.new_logprobs or []) + (b.new_logprobs or [])
    return RequestOutput(a.req_id, a.new_token_ids + b.new_token_ids, logprobs, b.finished, b.finish_reason,
                         b.num_prompt_tokens, b.num_cached_tokens, b.num_output_tokens, a.new_text + b.new_text)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}  # req_id -> outputs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._stopping = False
        self.num_steps = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))  # for the whole process
        self._thread.start()

    async def stop(self) -> None:
        if not self._thread.is_alive():
            return

        def stop() -> None:
            self._stopping = True

        self._commands.put(stop)
        await asyncio.to_thread(self._thread.join, 10.0)

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)` on the engine thread between steps and return its result."""
        assert self._loop is not None, "AsyncEngine.start() was not called"
        loop = self._loop
        fut: asyncio.Future[T] = loop.create_future()

        def run() -> None:
            try:
                result = fn(self.engine)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                loop.call_soon_threadsafe(_set_exception, fut, exc)
            else:
                loop.call_soon_threadsafe(_set_result, fut, result)

        self._commands.put(run)
        return await fut

    def submit(self, fn: Callable[[LLMEngine], object]) -> None:
        """Run `fn(engine)` on the engine thread without waiting (used from `finally` blocks)."""
        self._commands.put(lambda: fn(self.engine))

    async def generate(self, req_id: str, add: Callable[[LLMEngine], Sequence]) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. `add(engine)` enters it (add_request / add_prefilled_request).
        Leaving early (cancel, error, deadline) aborts the request and frees its blocks."""
        stream: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[req_id] = stream
        finished = False
        def add_and_check(e: LLMEngine) -> tuple[Sequence, bool]:
            seq = add(e)
            # Judged here, on the engine thread, before any step: by the time the caller sees the
            # result the engine may have stepped the sequence to its end (its outputs are queued).
            return seq, seq.is_finished

        try:
            seq, finished_when_added = await self.call(add_and_check)
            if finished_when_added:  # e.g. the first token (sampled elsewhere) was already the last
                finished = True
                yield RequestOutput(req_id, [], None, True, seq.finish_reason, seq.num_prompt_tokens,
                                    seq.num_cached_tokens, seq.num_output_tokens)
                return
            while True:
                out = await stream.get()
                if isinstance(out, BaseException):
                    finished = True
                    raise out
                while not out.finished and not stream.empty():
                    # the consumer fell behind the engine: hand it every output there is in one
                    nxt = stream.get_nowait()
                    if isinstance(nxt, BaseException):
                        finished = True
                        raise nxt
                    out = merge_outputs(out, nxt)
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(req_id, None)
            if not finished:
                self.submit(lambda e: e.abort_request(req_id))

    async def generate_simple(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams,
                              keep_blocks: bool = False, block_hashes: list | None = None
                              ) -> AsyncIterator[RequestOutput]:
        async for out in self.generate(req_id, lambda e: e.add_request(req_id, prompt_token_ids, params,
                                                                          keep_blocks=keep_blocks,
                                                                          block_hashes=block_hashes)):
            yield out

    # ---- engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        assert self._loop is not None
        while not self._stopping:
            try:
                cmd = self._commands.get(block=not self.engine.has_unfinished(), timeout=None)
            except queue.Empty:
                cmd = None
            while cmd is not None:
                try:
                    cmd()
                except Exception:  # noqa: BLE001 - commands report their own errors to callers
                    logger.exception("engine command failed")
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if self._stopping or not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
                self.num_steps += 1
            except Exception as exc:  # noqa: BLE001 - fail every request rather than the thread
                logger.exception("engine step failed; aborting all running requests")
                self._fail_all(exc)
                continue
            if outputs:
                self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.req_id)
            if stream is not None:
                stream.put_nowait(out)

    def _fail_all(self, exc: Exception) -> None:
        for req_id in list(self.engine.requests):
            self.engine.abort_request(req_id)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._fail_streams, exc)

    def _fail_streams(self, exc: Exception) -> None:
        for stream in self._streams.values():
            stream.put_nowait(exc)
