"""The router's HTTP front end (aiohttp): the OpenAI-compatible API (/v1/completions,
/v1/chat/completions with SSE streaming, /v1/models), /health and /metrics. Requests take the
same Dispatcher path as gRPC; typed errors become OpenAI error bodies through errors.http_status_of.

A client that goes away cancels its handler (handler_cancellation), which closes the dispatcher
stream and so releases the request on every worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import DeadlineExceeded, InvalidRequest, Overloaded, PdserveError, http_status_of
from pdserve.metrics_server import metrics_response
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.auth import OPEN_HTTP_PATHS, ApiKeyAuth, Unauthenticated
from pdserve.router.config import RouterConfig
from pdserve.router.dispatch import Dispatcher, Event
from pdserve.router.limits import FrontDoorLimits
from pdserve.router.metrics import HTTP_STATUSES, RouterMetrics
from pdserve.router.openai_protocol import (DEFAULT_COMPLETION_MAX_TOKENS, ModelNotFound, OpenAIRequest,
                                            ResponseBuilder, error_body, parse_chat, parse_completion)
from pdserve.router.registry import WorkerRegistry

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 2**20  # a prompt of a million token ids fits
SHUTDOWN_TIMEOUT_S = 2.0  # on stop, in-flight handlers get this long before they are cancelled
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _json_error(status: int, message: str, param: str | None = None, code: str | None = None,
                headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(status, message, param, code), status=status, headers=headers)


def _error_response(exc: BaseException) -> web.Response:
    status = http_status_of(exc)
    headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))} if isinstance(exc, Overloaded) else None
    return _json_error(status, str(exc), getattr(exc, "param", None), getattr(exc, "code", None), headers)


def _sse(body: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n".encode()


class HttpApi:
    def __init__(self, dispatcher: Dispatcher, registry: WorkerRegistry, metrics: RouterMetrics,
                 limits: FrontDoorLimits | None = None, auth: ApiKeyAuth | None = None) -> None:
        self.dispatcher = dispatcher
        self.registry = registry
        self.metrics = metrics
        self.auth = auth or ApiKeyAuth("")  # auth and limits are shared with the gRPC front end (none if not given)
        self.limits = limits or FrontDoorLimits(RouterConfig())
        self.started_at = int(time.time())
        self._runner: web.AppRunner | None = None
        self.address = ""

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors_middleware, self._auth_middleware],
                              client_max_size=min(MAX_BODY_BYTES, self.limits.max_request_bytes))
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/debug/requests", self.debug_requests)
        for path in ("/v1/completions", "/v1/chat/completions"):
            for status in HTTP_STATUSES:
                self.metrics.http_requests.labels(path, status)
        return app

    async def start(self, host: str, port: int) -> None:
        # handler_cancellation: a client disconnect cancels its handler, which aborts the request.
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, shutdown_timeout=SHUTDOWN_TIMEOUT_S).start()
        self.address = f"{host}:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _errors_middleware(self, request: web.Request, handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        path = resource.canonical if resource is not None else "other"
        try:
            response = await handler(request)
        except PdserveError as exc:
            response = _error_response(exc)
            if response.status >= 500:
                logger.warning("%s %s -> %d: %s", request.method, request.path, response.status, exc)
        except asyncio.TimeoutError:
            response = _error_response(DeadlineExceeded("request deadline exceeded"))
        except web.HTTPException as exc:
            response = _json_error(exc.status, exc.reason, code=str(exc.status), headers={
                k: v for k, v in exc.headers.items() if k.lower() == "allow"})
        except Exception as exc:  # noqa: BLE001 - the edge: anything unexpected is a 500 with a log line
            logger.exception("%s %s failed", request.method, request.path)
            response = _json_error(500, f"internal error: {type(exc).__name__}")
        self.metrics.http_requests.labels(path, str(response.status)).inc()
        return response

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler) -> web.StreamResponse:
        if self.auth.enabled and not request.path.startswith(OPEN_HTTP_PATHS):
            try:
                self.auth.check(request.headers.get("Authorization"))
            except Unauthenticated as exc:
                return _json_error(401, str(exc), code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    # ---- OpenAI API ---------------------------------------------------------------------------
    async def _body(self, request: web.Request) -> Any:
        try:
            return json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"the request body is not valid JSON: {exc}", param="body") from exc
        except RecursionError as exc:  # json's decoder recurses once per nesting level
            raise InvalidRequest("the request body's JSON is nested too deeply", param="body") from exc

    def _check_model(self, model: str) -> None:
        if model and model != self.dispatcher.meta.name:
            raise ModelNotFound(f"The model {model!r} does not exist; this server serves "
                                f"{self.dispatcher.meta.name!r} (see GET /v1/models)")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = parse_completion(await self._body(request))
        self._check_model(req.model)
        params = req.sampling_params(DEFAULT_COMPLETION_MAX_TOKENS)
        prompt_ids = self.dispatcher.prepare(req.prompt_text, req.prompt_ids, params)
        return await self._respond(request, req, prompt_ids, params, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        req = parse_chat(await self._body(request))
        self._check_model(req.model)
        tok = self.dispatcher.tokenizer
        assert req.messages is not None
        text = tok.apply_chat_template(req.messages, add_generation_prompt=True)
        # A template that writes bos itself must not get a second one from encode().
        writes_bos = bool(tok.bos_token) and text.startswith(tok.bos_token)
        prompt_ids = tok.encode(text, add_special_tokens=not writes_bos)
        rest_of_context = self.dispatcher.meta.max_model_len - len(prompt_ids)
        params = req.sampling_params(self.limits.default_max_tokens(rest_of_context))
        prompt_ids = self.dispatcher.prepare(None, prompt_ids, params)
        return await self._respond(request, req, prompt_ids, params, chat=True)

    async def _respond(self, request: web.Request, req: OpenAIRequest, prompt_ids: list[int],
                       params: SamplingParams, chat: bool) -> web.StreamResponse:
        self.limits.check_request(len(prompt_ids), params.max_tokens)
        out = ResponseBuilder(chat, self.dispatcher.meta.name, req.top_logprobs)
        with self.limits.stream(self.auth.client_key(request.headers.get("Authorization"), request.remote or "")):
            stream = self.dispatcher.generate(prompt_ids, params, req_id=out.id)
            try:
                first = await anext(stream)  # errors before the first token still get a proper HTTP status
                if req.stream:
                    return await self._stream(request, req, out, first, stream)
                return await self._whole(req, out, first, stream)
            finally:
                await stream.aclose()  # on any exit, disconnects included: aborts and frees the request

    def _logprobs(self, out: ResponseBuilder, ev: Event) -> dict | None:
        tokens = [self.dispatcher.tokenizer.decode([t], skip_special_tokens=False) for t in ev.token_ids]
        return out.logprobs(tokens, list(ev.logprobs))

    async def _whole(self, req: OpenAIRequest, out: ResponseBuilder, first: Event,
                     stream: AsyncIterator[Event]) -> web.Response:
        texts: list[str] = []
        tokens: list[int] = []
        logprobs: list[float] = []
        ev = first
        while True:
            texts.append(ev.text)
            tokens.extend(ev.token_ids)
            logprobs.extend(ev.logprobs)
            if ev.finish_reason:
                break
            ev = await anext(stream)
        lp = self._logprobs(out, Event(token_ids=tokens, logprobs=logprobs)) if req.logprobs else None
        return web.json_response(out.full("".join(texts), lp, ev.finish_reason, ev.usage or pb.Usage()))

    async def _stream(self, request: web.Request, req: OpenAIRequest, out: ResponseBuilder, first: Event,
                      stream: AsyncIterator[Event]) -> web.StreamResponse:
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        try:
            await self._write_events(resp, req, out, first, stream)
        except ConnectionResetError:  # the client left between two writes; _respond's finally aborts the request
            logger.info("[%s] client disconnected", out.id)
        return resp

    async def _write_events(self, resp: web.StreamResponse, req: OpenAIRequest, out: ResponseBuilder, first: Event,
                            stream: AsyncIterator[Event]) -> None:
        usage_field = req.include_usage
        if out.chat:  # the role comes first, alone, as OpenAI sends it
            await resp.write(_sse(out.chunk("", None, None, first=True, with_usage_field=usage_field)))
        ev: Event | None = first
        try:
            while ev is not None:
                # a chunk per generated token, its text empty while a cut character is held back
                # (as vLLM does): clients see progress and TTFT even when the bytes are incomplete
                if ev.text or ev.finish_reason or ev.token_ids:
                    lp = self._logprobs(out, ev) if req.logprobs and ev.token_ids else None
                    await resp.write(_sse(out.chunk(ev.text, lp, ev.finish_reason or None,
                                                    with_usage_field=usage_field)))
                if ev.finish_reason:
                    if req.include_usage:
                        await resp.write(_sse(out.usage_chunk(ev.usage or pb.Usage())))
                    break
                ev = await anext(stream, None)
        except (PdserveError, asyncio.TimeoutError) as exc:  # headers are sent: report in-band, as vLLM does
            err = exc if isinstance(exc, PdserveError) else DeadlineExceeded("request deadline exceeded")
            logger.warning("[%s] stream failed: %s", out.id, err)
            body = error_body(http_status_of(err), str(err), getattr(err, "param", None))
            await resp.write(_sse(body))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()

    async def models(self, request: web.Request) -> web.Response:
        reason = self.registry.unready_reason()
        if reason:  # a client that waits for /v1/models may send at once: only list the model once it is served
            return _json_error(503, f"not ready: {reason}", code="unavailable")
        m = self.dispatcher.meta
        return web.json_response({"object": "list", "data": [
            {"id": m.name, "object": "model", "created": self.started_at, "owned_by": "pdserve",
             "root": m.name, "max_model_len": m.max_model_len}]})

    # ---- operations ---------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        reason = self.registry.unready_reason()
        if reason:
            return web.json_response({"status": "unavailable", "reason": reason}, status=503)
        workers = self.registry.healthy(pb.DECODE, pb.COLOCATED)
        return web.json_response({"status": "ok", "num_decode_workers": len(workers),
                                  "num_prefill_workers": len(self.registry.healthy(pb.PREFILL))})

    async def debug_requests(self, request: web.Request) -> web.Response:
        """The hop timelines of the last requests (router/tracing.py), newest last."""
        tracer = self.dispatcher.tracer
        if tracer is None:
            return _json_error(404, "request tracing is off: start the router with --trace-requests N")
        return web.json_response({"requests": list(tracer.recent)})

    async def metrics_page(self, request: web.Request) -> web.Response:
        return metrics_response(self.metrics.registry)
