"""Drives one request through the cluster: decode reserve -> prefill (KV pushed to decode) ->
decode stream, or a local prefill on a decode/colocated worker, and streams the result.

Every hop has a deadline; leaving early for any reason (finish, abort, client cancel, deadline,
error) releases the request on every worker it touched.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from pdserve.convert import sampling_to_proto
from pdserve import rpc
from pdserve.engine.block_hash import BlockHash, chain_block_hashes
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from pdserve.errors import InvalidRequest, KVTransferError, Overloaded, PeerUnavailable, RequestAborted
from pdserve.planner.signals import Arrival, FinishedRequest
from pdserve.proto import kvstore_pb2 as kpb
from pdserve.proto import kvstore_pb2_grpc as kpb_grpc
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.config import RouterConfig
from pdserve.router.decode_stream import DecodeStreams
from pdserve.router.policy import Route, RoutingPolicy
from pdserve.router.registry import Worker, WorkerRegistry
from pdserve.router.tracing import RequestTracer
from pdserve.rpc import typed_error

logger = logging.getLogger(__name__)


@dataclass
class ModelMeta:
    name: str
    max_model_len: int
    vocab_size: int
    block_size: int
    fingerprint: bytes
    eos_token_id: int


@dataclass
class RequestState:
    req_id: str
    aborted: asyncio.Event = field(default_factory=asyncio.Event)
    calls: list = field(default_factory=list)  # downstream calls to cancel on abort
    releases: list = field(default_factory=list)  # Release calls in flight (awaited before a retry)
    peer_failed: str = ""  # set when the router cancelled its calls because a peer died (retriable)
    timing: pb.RequestTiming = field(default_factory=pb.RequestTiming)  # summed over attempts
    pending_tokens: int = 0  # prompt tokens admitted and not yet routed (RoutingPolicy.pending_prefill_tokens)
    kv_bytes_moved: int = 0  # KV bytes prefill workers pushed for it, over its attempts


@dataclass
class Event:
    """One message of a request's stream (what the gRPC and HTTP front ends turn into theirs)."""

    token_ids: list[int]
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""
    usage: pb.Usage | None = None
    prefill_worker: str = ""
    decode_worker: str = ""
    cached_tokens: int | None = None  # on an attempt's first event: its prompt tokens the worker did not compute
    timing: pb.RequestTiming | None = None  # on the final event: where the request's time went
    kv_bytes_moved: int = 0  # on the final event: KV bytes prefill workers pushed for it


PHASES = [f.name for f in pb.RequestTiming.DESCRIPTOR.fields]  # "router_s", "reserve_s", ...


def _added(total: pb.RequestTiming, part: pb.RequestTiming) -> pb.RequestTiming:
    """`total + part`, phase by phase."""
    return pb.RequestTiming(**{name: getattr(total, name) + getattr(part, name) for name in PHASES})


def finish_timing(timing: pb.RequestTiming, e2e_s: float) -> pb.RequestTiming:
    """The request's timing with router_s as the rest of its end-to-end time, so the parts add up to it."""
    out = pb.RequestTiming()
    out.CopyFrom(timing)
    out.router_s = max(0.0, e2e_s - sum(getattr(timing, name) for name in PHASES if name != "router_s"))
    return out


class Dispatcher:
    def __init__(self, config: RouterConfig, registry: WorkerRegistry, tokenizer: Tokenizer, meta: ModelMeta,
                 tracer: RequestTracer | None = None) -> None:
        self.config = config
        self.tracer = tracer  # per-request timelines (--trace-requests), or None
        self.registry = registry
        self.tokenizer = tokenizer
        self.meta = meta
        self.active: dict[str, RequestState] = {}  # req_id -> live request
        self.num_requests = 0
        self.num_retries = 0
        self.num_failovers = 0  # streams moved to another worker after their decode worker failed mid-stream
        self.num_failover_recomputed_tokens = 0  # prompt + streamed tokens those moves computed again
        self.num_rejected = 0
        self.kv_bytes_moved = 0  # KV bytes prefill workers pushed to decode workers for this router's requests
        self.policy = RoutingPolicy(config, meta.block_size)  # every decision of where a request goes
        self.finished_listeners: list[Callable[[FinishedRequest], None]] = []  # the planner's signals
        self.arrival_listeners: list[Callable[[Arrival], None]] = []  # ... and every admitted request
        self._store_channel = rpc.channel(config.kvstore_master) if config.kvstore_master else None
        self._store = kpb_grpc.KVStoreMasterStub(self._store_channel) if self._store_channel else None
        self.decode_streams = DecodeStreams()  # one DecodeStream per worker carries all its requests' tokens

    async def close(self) -> None:
        await self.decode_streams.close()
        if self.tracer is not None:  # flushes the last spans (bounded by the exporter's deadline) off the loop
            await asyncio.to_thread(self.tracer.shutdown)
        if self._store_channel is not None:
            await self._store_channel.close()

    async def stored_prefix_blocks(self, hashes: list[BlockHash]) -> int:
        """How many leading blocks the store holds (0 when there is no store or it does not answer)."""
        if self._store is None or not hashes:
            return 0
        try:
            resp = await self._store.BatchLookup(kpb.BatchLookupRequest(
                keys=hashes, model_fingerprint=self.meta.fingerprint), timeout=0.5)
        except grpc.aio.AioRpcError:
            return 0
        return resp.num_stored_prefix

    # ---- validation ---------------------------------------------------------------------------
    def prepare(self, prompt_text: str | None, prompt_ids: list[int] | None, params: SamplingParams,
                model: str = "") -> list[int]:
        if model and model != self.meta.name:
            raise InvalidRequest(f"model {model!r} is not served here; this router serves {self.meta.name!r}")
        if prompt_ids is None:
            if not prompt_text:
                raise InvalidRequest("prompt is empty: give prompt text or token ids")
            prompt_ids = self.tokenizer.encode(prompt_text)
        if not prompt_ids:
            raise InvalidRequest("prompt is empty: give prompt text or token ids")
        bad = next((t for t in prompt_ids if not 0 <= t < self.meta.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"prompt token id {bad} is outside the vocabulary [0, {self.meta.vocab_size})")
        limit = self.meta.max_model_len
        if len(prompt_ids) >= limit:
            raise InvalidRequest(f"prompt has {len(prompt_ids)} tokens; the model's maximum context is {limit}: "
                                 "shorten the prompt")
        if len(prompt_ids) + params.max_tokens > limit:
            raise InvalidRequest(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                                 f"maximum context of {limit}: lower max_tokens to at most {limit - len(prompt_ids)}")
        return list(prompt_ids)

    def abort(self, req_id: str) -> bool:
        state = self.active.get(req_id)
        if state is None:
            return False
        state.aborted.set()
        for call in state.calls:
            call.cancel()
        return True

    # ---- the request path ---------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams, *, req_id: str = "",
                       timeout_s: float | None = None, detokenize: bool = True) -> AsyncIterator[Event]:
        req_id = req_id or f"req-{uuid.uuid4().hex[:16]}"
        if req_id in self.active:
            raise InvalidRequest(f"request_id {req_id!r} is already in flight")
        deadline = time.monotonic() + min(timeout_s or self.config.request_timeout_s, self.config.request_timeout_s)
        self._admit(len(prompt_ids))
        if self.arrival_listeners:
            arrival = Arrival(time.monotonic(), len(prompt_ids), params.max_tokens)
            for listener in self.arrival_listeners:
                listener(arrival)
        state = RequestState(req_id, pending_tokens=len(prompt_ids))
        self.policy.pending_prefill_tokens += state.pending_tokens
        self.active[req_id] = state
        self.num_requests += 1
        detok = IncrementalDetokenizer(self.tokenizer, stop_strings=params.stop, prompt_ids=prompt_ids) \
            if detokenize or params.stop else None
        usage = pb.Usage(prompt_tokens=len(prompt_ids))
        started_at, started_unix_s = time.monotonic(), time.time()
        workers = ("", "")  # (prefill, decode) of the attempt that streamed
        token_times: list[float] = []  # when the first, second and latest token arrived
        try:
            async for ev in self._route(state, prompt_ids, params, deadline, usage):
                if ev.token_ids:
                    now = time.monotonic()
                    token_times[2:] = []
                    token_times.append(now)
                if ev.timing is not None:  # a worker's parts of the final attempt
                    state.timing.CopyFrom(_added(state.timing, ev.timing))
                if ev.decode_worker:
                    workers = (ev.prefill_worker, ev.decode_worker)
                if ev.cached_tokens is not None and usage.completion_tokens == 0:  # the first attempt's prompt
                    usage.cached_tokens = ev.cached_tokens
                usage.completion_tokens += len(ev.token_ids)
                if detok is not None and ev.token_ids:
                    ev.text = detok.feed(ev.token_ids)
                    if detok.stopped:
                        ev.finish_reason = "stop"
                if ev.finish_reason:
                    if detok is not None and not detok.stopped:
                        ev.text += detok.flush()
                    ev.usage = usage
                    ev.kv_bytes_moved = state.kv_bytes_moved
                    ev.timing = finish_timing(state.timing, time.monotonic() - started_at)
                    if self.tracer is not None:
                        self.tracer.record(req_id, started_unix_s, ev.timing, *workers, ev.finish_reason)
                    if self.finished_listeners and token_times:
                        self._tell_finished(started_at, token_times, usage, workers)
                    if not detokenize:
                        ev.text = ""
                    yield ev
                    return
                if not detokenize:
                    ev.text = ""
                yield ev
        finally:
            self._unpend(state)
            self.active.pop(req_id, None)

    def _tell_finished(self, started_at: float, token_times: list[float], usage: pb.Usage,
                       workers: tuple[str, str]) -> None:
        n = usage.completion_tokens
        first, last = token_times[0], token_times[-1]
        gap1 = token_times[1] - first if len(token_times) > 1 else 0.0
        tpot = (last - first) / (n - 1) if n > 1 else 0.0
        gaps = (last - token_times[1]) / (n - 2) if n > 2 and len(token_times) > 2 else tpot
        done = FinishedRequest(finished_at=last, prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens,
                               output_tokens=n, ttft_s=first - started_at, tpot_s=tpot, gap1_s=gap1, gaps_s=gaps,
                               remote=workers[0] != workers[1])
        for listener in self.finished_listeners:
            listener(done)

    def _unpend(self, state: RequestState) -> None:
        """The request's prompt is now counted on a worker's queue (or the request ended)."""
        self.policy.pending_prefill_tokens -= state.pending_tokens
        state.pending_tokens = 0

    def _remaining(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise asyncio.TimeoutError()
        return left

    def _admit(self, num_prompt_tokens: int) -> None:
        """Reject early instead of queueing without bound (Mooncake-style early rejection)."""
        if len(self.active) >= self.config.max_inflight_requests:
            self.num_rejected += 1
            raise Overloaded(f"{len(self.active)} requests in flight (limit {self.config.max_inflight_requests}); "
                             "retry later", retry_after_s=1.0)
        if self.config.ttft_slo_ms > 0:
            predicted_ms = 1e3 * self.predict_ttft_s(num_prompt_tokens)
            if predicted_ms > self.config.ttft_slo_ms:
                self.num_rejected += 1
                raise Overloaded(f"predicted time to first token {predicted_ms:.0f} ms exceeds the "
                                 f"{self.config.ttft_slo_ms:.0f} ms SLO; retry later",
                                 retry_after_s=max(0.5, predicted_ms / 1e3))

    def predict_ttft_s(self, num_prompt_tokens: int) -> float:
        return self.policy.predict_ttft_s(self.registry.workers.values(), num_prompt_tokens)

    async def _route(self, state: RequestState, prompt_ids: list[int], params: SamplingParams, deadline: float,
                     usage: pb.Usage) -> AsyncIterator[Event]:
        """Run the request, retrying on another worker when one fails. A decode failure mid-stream
        continues from the tokens already streamed (prompt + those tokens, the rest of the budget),
        so the client sees no duplicate and no gap."""
        generated: list[int] = []
        excluded: set[str] = set()
        failures = 0
        while True:
            attempt_prompt = prompt_ids + generated
            attempt_params = params.continued(len(generated))
            resumed = bool(generated)  # a failover mid-stream: decode published the streamed tokens' full blocks
            try:
                async for ev in self._attempt(state, attempt_prompt, attempt_params, deadline, usage, excluded):
                    if resumed and ev.cached_tokens is not None:
                        resumed = False
                        self.observe_failover(state.req_id, len(attempt_prompt) - ev.cached_tokens)
                    generated.extend(ev.token_ids)
                    yield ev
                return
            except (PeerUnavailable, KVTransferError) as exc:
                if state.aborted.is_set():
                    raise
                failures += 1
                if failures > self.config.max_retries:
                    raise
                self.num_retries += 1
                delay = self.config.retry_backoff_s * 2 ** (failures - 1)
                logger.warning("[%s] %s; retry %d/%d in %.2f s with %d tokens already streamed", state.req_id, exc,
                               failures, self.config.max_retries, delay, len(generated))
                await asyncio.sleep(min(delay, self._remaining(deadline)))
                if state.releases:  # the retry reuses the request id: no stale Release may hit it
                    await asyncio.wait(state.releases, timeout=min(5.0, self._remaining(deadline)))
                    state.releases.clear()
                await self._wait_for_candidates(excluded, deadline)

    def observe_failover(self, req_id: str, num_recomputed_tokens: int) -> None:
        """A stream continued elsewhere computed `num_recomputed_tokens` of its prompt + streamed tokens again
        (the rest came from the new worker's prefix cache or the store)."""
        self.num_failovers += 1
        self.num_failover_recomputed_tokens += num_recomputed_tokens
        logger.info("[%s] failover recomputed %d tokens", req_id, num_recomputed_tokens)

    async def _wait_for_candidates(self, excluded: set[str], deadline: float) -> None:
        """Before a retry: if every healthy decode-capable worker is excluded, forget the exclusions
        (it may have been restarted at its old address, or the failure was its peer's). With no
        healthy worker at all the next attempt fails fast with UNAVAILABLE: never wait for one."""
        healthy = self.registry.healthy(pb.DECODE, pb.COLOCATED)
        if healthy and all(w.address in excluded for w in healthy):
            excluded.clear()

    async def _reserve(self, state: RequestState, route: Route, prompt_ids: list[int], params: SamplingParams,
                       deadline: float, excluded: set[str]) -> tuple[Worker, pb.TransferDescriptor]:
        """Reserve on the route's decode worker, then on its fallbacks in order while each is Overloaded."""
        for decode in [route.decode, *route.decode_fallbacks]:
            try:
                desc = await self._reserve_on(state, decode, prompt_ids, params, deadline)
                return decode, desc
            except grpc.aio.AioRpcError as exc:
                err = typed_error(exc, f"decode {decode.worker_id} Reserve")
                if isinstance(err, Overloaded):
                    continue
                if isinstance(err, (PeerUnavailable, KVTransferError)):
                    excluded.add(decode.address)
                raise err from exc
        self.num_rejected += 1
        raise Overloaded("every decode worker is out of KV blocks; retry later", retry_after_s=1.0)

    async def _reserve_on(self, state: RequestState, decode: Worker, prompt_ids: list[int],
                          params: SamplingParams, deadline: float) -> pb.TransferDescriptor:
        """One Reserve call; if the request is cancelled while it is in flight, the reservation it
        may have made is released (instead of waiting for its expiry)."""
        try:
            return await decode.decode_stub.Reserve(pb.ReserveRequest(
                request_id=state.req_id, num_prompt_tokens=len(prompt_ids), max_tokens=params.max_tokens,
                model_fingerprint=self.meta.fingerprint,
                timeout_s=min(self.config.hop_timeout_s, self._remaining(deadline))),
                timeout=min(self.config.hop_timeout_s, self._remaining(deadline)))
        except asyncio.CancelledError:
            self._release_later(decode, state.req_id, state)
            raise

    async def _attempt(self, state: RequestState, prompt_ids: list[int], params: SamplingParams, deadline: float,
                       usage: pb.Usage, excluded: set[str]) -> AsyncIterator[Event]:
        hashes = chain_block_hashes(prompt_ids, self.meta.block_size, self.meta.fingerprint)
        stored = await self.stored_prefix_blocks(hashes)
        route = self.policy.route(list(self.registry.workers.values()), len(prompt_ids), hashes, stored, excluded)
        if route is None:
            raise PeerUnavailable("no healthy decode or colocated worker is available")
        self._unpend(state)
        try:
            async for ev in (self._local(state, route, prompt_ids, params, hashes, deadline, excluded) if route.local
                             else self._remote(state, route, prompt_ids, params, hashes, deadline, usage, excluded)):
                yield ev
        finally:
            self.policy.prefill_done(route)

    async def _local(self, state: RequestState, route: Route, prompt_ids: list[int], params: SamplingParams,
                     hashes: list[BlockHash], deadline: float, excluded: set[str]) -> AsyncIterator[Event]:
        """Prefill on the decode (or colocated) worker itself, then stream."""
        decode = route.decode
        logger.debug("[%s] local prefill on %s (%d prompt tokens): %s", state.req_id, decode.worker_id,
                     len(prompt_ids), route.reason)
        first = True
        try:
            async for ev in self._decode_stream(state, decode, pb.DecodeRequest(
                    request_id=state.req_id, prompt_token_ids=prompt_ids, sampling=sampling_to_proto(params),
                    block_hashes=hashes), deadline):
                if first:
                    ev.decode_worker = ev.prefill_worker = decode.worker_id
                    first = False
                    self.policy.prefill_done(route)
                yield ev
        except (PeerUnavailable, KVTransferError):
            excluded.add(decode.address)
            raise

    async def _remote(self, state: RequestState, route: Route, prompt_ids: list[int], params: SamplingParams,
                      hashes: list[BlockHash], deadline: float, usage: pb.Usage, excluded: set[str]
                      ) -> AsyncIterator[Event]:
        """Reserve on decode, prefill on the prefill worker (KV pushed to decode), then stream from decode."""
        prefill = route.prefill
        assert prefill is not None and route.choice is not None
        logger.debug("[%s] prefill choice %s: est. TTFT %.1f ms, %d cached tokens (%d from the store)",
                     state.req_id, prefill.worker_id, 1e3 * route.choice.estimated_ttft_s, route.choice.cached_tokens,
                     route.choice.store_tokens)
        reserve_started = time.monotonic()
        try:
            decode, desc = await self._reserve(state, route, prompt_ids, params, deadline, excluded)
        finally:
            state.timing.reserve_s += time.monotonic() - reserve_started
        logger.debug("[%s] prefill on %s, decode on %s (%d prompt tokens)", state.req_id, prefill.worker_id,
                     decode.worker_id, len(prompt_ids))
        reserved = True
        decode.inflight += 1
        try:
            prefill.inflight += 1
            try:
                call = prefill.prefill_stub.Prefill(pb.PrefillRequest(
                    request_id=state.req_id, prompt_token_ids=prompt_ids, sampling=sampling_to_proto(params),
                    destination=desc, block_hashes=hashes),
                    timeout=min(self.config.hop_timeout_s, self._remaining(deadline)))
                state.calls.append(call)
                try:
                    resp = await self._await_call(state, call, f"prefill {prefill.worker_id}")
                except (PeerUnavailable, KVTransferError):
                    excluded.add(prefill.address)
                    raise
            finally:
                prefill.inflight -= 1
                self.policy.prefill_done(route)
            self.policy.observe_prefill(len(prompt_ids) - resp.num_cached_tokens, resp.prefill_seconds)
            self.kv_bytes_moved += resp.kv_bytes_sent
            state.kv_bytes_moved += resp.kv_bytes_sent
            state.timing.prefill_queue_s += resp.queue_seconds
            state.timing.prefill_compute_s += resp.prefill_seconds
            self.policy.record_prefill(prefill.address, hashes, prefill.stats.num_kv_blocks)
            first = Event(token_ids=[resp.first_token_id], prefill_worker=prefill.worker_id,
                          decode_worker=decode.worker_id, cached_tokens=resp.num_cached_tokens)
            if params.logprobs and resp.HasField("first_logprob"):
                first.logprobs = [resp.first_logprob]
            req = pb.DecodeRequest(request_id=state.req_id, prompt_token_ids=prompt_ids,
                                   sampling=sampling_to_proto(params), prefilled=True,
                                   first_token_id=resp.first_token_id, num_cached_tokens=resp.num_cached_tokens,
                                   block_hashes=hashes)
            if resp.HasField("first_logprob"):
                req.first_logprob = resp.first_logprob
            yield first  # TTFT: stream the first token the moment prefill has it
            reserved = False  # from here the Decode call owns the reservation (its cleanup releases it)
            # Prefill answers before its last KV bytes land; if it dies in that window, decode would
            # wait for the whole reservation timeout. Watch its health until decode's first message.
            watch = asyncio.create_task(self._watch_prefill(state, prefill))
            try:
                async for ev in self._decode_stream(state, decode, req, deadline, counted=False):
                    watch.cancel()
                    yield ev
            except KVTransferError:
                excluded.add(prefill.address)  # the KV never came: the sender is at fault, not decode
                raise
            except PeerUnavailable:
                if watch.done() and not watch.cancelled():
                    excluded.add(prefill.address)  # decode was fine: its KV source died
                else:
                    excluded.add(decode.address)
                raise
            finally:
                watch.cancel()
        finally:
            decode.inflight -= 1
            if reserved:
                self._release_later(decode, state.req_id, state)

    async def _watch_prefill(self, state: RequestState, prefill: Worker) -> bool:
        """Returns True (after cancelling the request's calls) if `prefill` turns unhealthy."""
        while prefill.healthy and prefill.address in self.registry.workers:
            await asyncio.sleep(self.config.health_interval_s)
        state.peer_failed = f"prefill {prefill.worker_id} died before its KV landed"
        for call in state.calls:
            call.cancel()
        return True

    async def _await_call(self, state: RequestState, call, peer: str):
        try:
            return await call
        except asyncio.CancelledError:
            if state.aborted.is_set():
                raise RequestAborted(f"request {state.req_id} was aborted") from None
            raise
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and state.aborted.is_set():
                raise RequestAborted(f"request {state.req_id} was aborted") from exc
            raise typed_error(exc, peer) from exc

    async def _decode_stream(self, state: RequestState, decode: Worker, req: pb.DecodeRequest, deadline: float,
                             counted: bool = True) -> AsyncIterator[Event]:
        if counted:
            decode.inflight += 1
        call = self.decode_streams.start(decode, req, self._remaining(deadline))  # reads like a Decode call
        state.calls.append(call)
        finished = False
        try:
            while True:
                try:
                    msg = await call.read()
                except asyncio.CancelledError:
                    if state.aborted.is_set():
                        finished = True
                        yield Event(token_ids=[], finish_reason="abort")
                        return
                    if state.peer_failed:
                        failed, state.peer_failed = state.peer_failed, ""
                        raise PeerUnavailable(failed) from None
                    raise
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.CANCELLED and state.peer_failed:
                        failed, state.peer_failed = state.peer_failed, ""
                        raise PeerUnavailable(failed) from exc
                    if exc.code() == grpc.StatusCode.CANCELLED and state.aborted.is_set():
                        finished = True
                        yield Event(token_ids=[], finish_reason="abort")
                        return
                    raise typed_error(exc, f"decode {decode.worker_id}") from exc
                if msg is grpc.aio.EOF:
                    raise PeerUnavailable(f"decode {decode.worker_id} ended the stream without a finish reason")
                ev = Event(token_ids=list(msg.token_ids), logprobs=list(msg.logprobs), finish_reason=msg.finish_reason,
                           timing=msg.timing if msg.HasField("timing") else None)
                if not req.prefilled and ev.cached_tokens is None:
                    ev.cached_tokens = msg.num_cached_tokens
                    req.prefilled = True  # only the first message carries it
                if msg.finish_reason:
                    finished = True
                yield ev
                if finished:
                    return
        finally:
            if counted:
                decode.inflight -= 1
            if not finished:
                call.cancel()
                self._release_later(decode, req.request_id, state)

    def _release_later(self, worker: Worker, req_id: str, state: RequestState | None = None) -> None:
        """Tell a worker to drop everything it holds for `req_id` (best effort, bounded, in the
        background). A retry of the same request id first waits for these (`state.releases`), so a
        late Release can never free the retry's new reservation."""
        async def release() -> None:
            try:
                await worker.decode_stub.Release(pb.ReleaseRequest(request_id=req_id), timeout=5.0)
            except grpc.aio.AioRpcError as exc:
                logger.debug("[%s] release on %s failed: %s", req_id, worker.worker_id, exc.code().name)

        task = asyncio.get_running_loop().create_task(release())
        if state is not None:
            state.releases.append(task)
