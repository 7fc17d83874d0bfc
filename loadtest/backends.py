"""How one request reaches a server: the `Backend` interface, the OpenAI HTTP backends and the
pdserve gRPC backend.

A backend sends one `BenchRequest`, streams the answer, calls `on_token` as output arrives and
returns a `RequestResult` with raw perf_counter times. It never decides when to send (the
runner does) nor computes statistics (metrics does). Add a backend by subclassing `Backend`
and listing it in `BACKENDS`.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from .request import BenchRequest, RequestResult

if TYPE_CHECKING:
    import aiohttp

    from .config import BenchConfig

# Called with the number of new output tokens (best effort: 1 per streamed chunk for SSE).
OnToken = Callable[[int], None]

MODELS_TIMEOUT_S = 10.0
ERROR_BODY_CHARS = 500


class Backend(ABC):
    accepts_token_ids: ClassVar[bool] = False  # may `request.prompt` be a list of token ids?
    exact_token_counts: ClassVar[bool] = False  # True: output_len is exact, never re-counted by tokenizer

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.model: str | None = config.model  # the runner fills it from list_models() when None

    async def __aenter__(self) -> Backend:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Set up connections; called once before the first `send`."""

    async def close(self) -> None:
        """Release connections; called once after the last `send` returned or was cancelled."""

    @abstractmethod
    async def list_models(self) -> list[str]:
        """Model names the server serves (the first is the default)."""

    @abstractmethod
    async def send(self, request: BenchRequest, on_token: OnToken | None = None) -> RequestResult:
        """Send one request and stream it to the end; failures come back as a result with
        success False and an `error_kind`, never as an exception (cancellation excepted)."""


class OpenAIHTTPBackend(Backend):
    """Shared SSE streaming for /v1/completions and /v1/chat/completions."""

    path: ClassVar[str]

    def __init__(self, config: BenchConfig) -> None:
        super().__init__(config)
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        import aiohttp  # here, not at the top: `pdserve --help` should not pay for it

        # limit=0: no connection pool cap, or aiohttp's default of 100 would queue requests
        # inside the client and count that wait as server latency.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=self.config.request_timeout_s),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def list_models(self) -> list[str]:
        import aiohttp

        assert self._session is not None, "open() first"
        timeout = aiohttp.ClientTimeout(total=MODELS_TIMEOUT_S)
        async with self._session.get(f"{self.config.base_url}/v1/models", timeout=timeout) as resp:
            resp.raise_for_status()
            body = await resp.json()
        return [m["id"] for m in body.get("data", [])]

    @abstractmethod
    def _payload(self, request: BenchRequest) -> dict[str, Any]: ...

    @abstractmethod
    def _delta_text(self, choice: dict[str, Any]) -> str: ...

    def _common_payload(self, request: BenchRequest) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.max_tokens,
            "temperature": self.config.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.config.ignore_eos:
            payload["ignore_eos"] = True
        payload.update(self.config.extra_body)
        return payload

    async def send(self, request: BenchRequest, on_token: OnToken | None = None) -> RequestResult:
        assert self._session is not None, "open() first"
        result = RequestResult(request_id=request.request_id, prompt_len=request.prompt_len)
        text_parts: list[str] = []
        num_chunks = 0
        result.start_time = time.perf_counter()
        try:
            async with self._session.post(f"{self.config.base_url}{self.path}", json=self._payload(request)) as resp:
                if resp.status != 200:
                    result.error_kind = f"http_{resp.status}"
                    result.error = (await resp.text())[:ERROR_BODY_CHARS]
                    return result
                async for raw_line in resp.content:
                    line = raw_line.strip()
                    if not line.startswith(b"data:"):
                        continue  # blank separators, comments, event names
                    data = line[len(b"data:"):].strip()
                    if data == b"[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        result.error_kind = "stream_error"
                        result.error = str(chunk["error"])[:ERROR_BODY_CHARS]
                        return result
                    if usage := chunk.get("usage"):
                        result.usage_prompt_tokens = usage.get("prompt_tokens")
                        result.usage_completion_tokens = usage.get("completion_tokens")
                        details = usage.get("prompt_tokens_details") or {}
                        result.usage_cached_tokens = details.get("cached_tokens")
                    for choice in chunk.get("choices") or ():
                        if text := self._delta_text(choice):
                            result.chunk_times.append(time.perf_counter())
                            text_parts.append(text)
                            num_chunks += 1
                            if on_token is not None:
                                on_token(1)
            result.success = True
        except Exception as exc:  # any failure is a result to count; CancelledError is not an Exception
            result.error_kind = type(exc).__name__
            result.error = str(exc)[:ERROR_BODY_CHARS]
        finally:
            result.end_time = time.perf_counter()
            result.output_text = "".join(text_parts)
            result.output_len = result.usage_completion_tokens if result.usage_completion_tokens is not None else num_chunks
        return result


class OpenAICompletionsBackend(OpenAIHTTPBackend):
    accepts_token_ids = True  # vLLM, SGLang and pdserve take `prompt` as a list of ints
    path = "/v1/completions"

    def _payload(self, request: BenchRequest) -> dict[str, Any]:
        return {**self._common_payload(request), "prompt": request.prompt}

    def _delta_text(self, choice: dict[str, Any]) -> str:
        return choice.get("text") or ""


class OpenAIChatBackend(OpenAIHTTPBackend):
    path = "/v1/chat/completions"

    def _payload(self, request: BenchRequest) -> dict[str, Any]:
        assert isinstance(request.prompt, str), "chat takes text prompts"
        return {**self._common_payload(request), "messages": [{"role": "user", "content": request.prompt}]}

    def _delta_text(self, choice: dict[str, Any]) -> str:
        return (choice.get("delta") or {}).get("content") or ""


class PdserveGrpcBackend(Backend):
    """The pdserve router's gRPC `Generate` (base_url grpc://host:port): token ids in, exact token counts out."""

    accepts_token_ids = True
    exact_token_counts = True  # each message carries its token ids

    def __init__(self, config: BenchConfig) -> None:
        super().__init__(config)
        self._client: Any = None
        self._sampling: dict[str, Any] = {}

    async def open(self) -> None:
        import inspect

        from pdserve.client import Client, build_request

        scheme, _, address = self.config.base_url.partition("://")
        if scheme != "grpc":
            raise ValueError(f"backend pdserve-grpc needs base_url grpc://host:port, got {self.config.base_url!r}")
        known = set(inspect.signature(build_request).parameters) - {"prompt", "request_id", "model", "max_tokens"}
        unknown = set(self.config.extra_body) - known
        if unknown:
            raise ValueError(f"extra_body fields {sorted(unknown)} have no pdserve-grpc equivalent; "
                             f"known: {sorted(known)}")
        self._sampling = {"temperature": self.config.temperature, "ignore_eos": self.config.ignore_eos,
                          "skip_detokenize": not self.config.save_output_text, "return_timing": True,
                          **self.config.extra_body}
        self._client = Client(address)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def list_models(self) -> list[str]:
        assert self._client is not None, "open() first"
        return [(await self._client.model_info(timeout_s=MODELS_TIMEOUT_S)).name]

    async def send(self, request: BenchRequest, on_token: OnToken | None = None) -> RequestResult:
        import grpc

        assert self._client is not None, "open() first"
        result = RequestResult(request_id=request.request_id, prompt_len=request.prompt_len)
        text_parts: list[str] = []
        result.start_time = time.perf_counter()
        try:
            async for msg in self._client.generate(request.prompt, timeout_s=self.config.request_timeout_s,
                                                   max_tokens=request.max_tokens, model=self.model or "",
                                                   **self._sampling):
                if msg.decode_worker and result.prefilled_remotely is None:
                    result.prefilled_remotely = msg.prefill_worker != msg.decode_worker
                if msg.token_ids:
                    result.chunk_times.append(time.perf_counter())
                    result.output_len += len(msg.token_ids)
                    text_parts.append(msg.text)
                    if on_token is not None:
                        on_token(len(msg.token_ids))
                if msg.finish_reason:
                    result.usage_prompt_tokens = msg.usage.prompt_tokens
                    result.usage_completion_tokens = msg.usage.completion_tokens
                    result.usage_cached_tokens = msg.usage.cached_tokens
                    result.kv_bytes_moved = msg.kv_bytes_moved
                    if msg.HasField("timing"):
                        result.phase_s = {f.name.removesuffix("_s"): getattr(msg.timing, f.name)
                                          for f in msg.timing.DESCRIPTOR.fields}
            result.success = True
        except grpc.aio.AioRpcError as exc:
            result.error_kind = f"grpc_{exc.code().name.lower()}"
            result.error = (exc.details() or "")[:ERROR_BODY_CHARS]
        except Exception as exc:  # any failure is a result to count; CancelledError is not an Exception
            result.error_kind = type(exc).__name__
            result.error = str(exc)[:ERROR_BODY_CHARS]
        finally:
            result.end_time = time.perf_counter()
            result.output_text = "".join(text_parts)
        return result


# backend name (--backend) -> class
BACKENDS: dict[str, type[Backend]] = {
    "openai-completions": OpenAICompletionsBackend,
    "openai-chat": OpenAIChatBackend,
    "pdserve-grpc": PdserveGrpcBackend,
}
