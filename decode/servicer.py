"""The decode worker's gRPC service: Reserve, Renew, Release, Decode (stream tokens), Stats.

A colocated worker is this same service with role COLOCATED: it only ever receives Decode
requests that prefill locally.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from pdserve.convert import check_token_ids, layout_to_proto, sampling_from_proto
from pdserve.decode.block_publisher import GeneratedBlockPublisher
from pdserve.decode.reservations import ReservationTable
from pdserve.engine.block_hash import chain_block_hashes
from pdserve.engine.connector import check_block_hashes
from pdserve.engine.llm_engine import LLMEngine
from pdserve.errors import InvalidRequest, PdserveError, grpc_status_of
from pdserve.prefill.store_prefix import StorePrefix
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.rpc import map_errors, map_stream_errors
from pdserve.worker_runtime import WorkerRuntime

logger = logging.getLogger(__name__)



def decode_timing(seq, prefilled: bool, arrived_at: float, landed_at: float, first_out_at: float) -> pb.RequestTiming:
    """The parts of a request's time this worker saw (monotonic seconds of this process). A prefilled
    sequence's first message here is its first decode step's token: until then it was joining the batch."""
    done = time.monotonic()
    if prefilled:
        return pb.RequestTiming(kv_transfer_tail_s=landed_at - arrived_at, decode_admission_s=first_out_at - landed_at,
                                decode_s=done - first_out_at)
    scheduled = seq.first_scheduled_time or arrived_at
    first_token = seq.first_token_time or first_out_at
    return pb.RequestTiming(prefill_queue_s=max(0.0, scheduled - arrived_at),
                            prefill_compute_s=max(0.0, first_token - scheduled), decode_s=max(0.0, done - first_token))


class OutputBatcher:
    """DecodeStream's outgoing side: outputs added during one turn of the event loop leave in one DecodeBatch
    (and more, when the reader lags: whatever piled up while the last write was in flight)."""

    def __init__(self) -> None:
        self.batch = pb.DecodeBatch()
        self._ready = asyncio.Event()
        self._closed = False

    def add(self, req_id: str, msg: pb.DecodeResponse) -> None:
        out = self.batch.outputs.add(request_id=req_id)
        out.response.CopyFrom(msg)
        self._ready.set()

    def fail(self, req_id: str, code: grpc.StatusCode, message: str) -> None:
        self.batch.outputs.add(request_id=req_id, error_code=code.value[0], error_message=message)
        self._ready.set()

    def close(self) -> None:
        """Nothing more will be added: `write_to` returns once the last batch is out."""
        self._closed = True
        self._ready.set()

    async def write_to(self, context: grpc.aio.ServicerContext) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            if self.batch.outputs:
                batch, self.batch = self.batch, pb.DecodeBatch()
                await context.write(batch)
            elif self._closed:
                return


class DecodeServicer(pb_grpc.DecodeWorkerServicer):
    def __init__(self, runtime: WorkerRuntime, reservations: ReservationTable) -> None:
        self.runtime = runtime
        self.reservations = reservations
        # local prefills load the store's blocks this worker lacks and publish what they computed, as
        # prefill workers do (the same StorePrefix); None without a store
        self.store_prefix = StorePrefix(runtime.engine, runtime.store, publish=runtime.config.store_publish) \
            if runtime.store is not None else None
        # generated blocks go to the store as they fill (the engine thread stages them), so a failover
        # elsewhere resumes from stored KV instead of recomputing the stream
        self.publisher = None
        if runtime.store is not None and runtime.config.store_publish_generated:
            assert runtime.engine is not None
            self.publisher = GeneratedBlockPublisher(runtime.store, self.llm.config.block_size,
                                                     asyncio.get_running_loop(),
                                                     runtime.config.store_publish_queue_blocks)
            hook = self.publisher.on_full_blocks
            runtime.engine.submit(lambda e: setattr(e, "full_block_hook", hook))
        self.num_local_prefills = 0
        self.num_remote_prefills = 0
        runtime.stats_parts.append(self._add_stats)

    @property
    def llm(self) -> LLMEngine:
        assert self.runtime.engine is not None
        return self.runtime.engine.engine

    @map_errors
    async def Reserve(self, request: pb.ReserveRequest, context: grpc.aio.ServicerContext) -> pb.TransferDescriptor:
        if request.model_fingerprint and request.model_fingerprint != self.llm.fingerprint:
            raise InvalidRequest("model fingerprint mismatch: this decode worker serves another model")
        if not request.request_id or request.num_prompt_tokens < 1 or request.max_tokens < 1:
            raise InvalidRequest("Reserve needs request_id, num_prompt_tokens >= 1 and max_tokens >= 1")
        res = await self.reservations.reserve(request.request_id, request.num_prompt_tokens, request.max_tokens,
                                              request.timeout_s or None)
        return pb.TransferDescriptor(
            request_id=request.request_id, transfer_address=self.runtime.transfer_address,
            block_ids=res.block_ids, token=res.token, tag=int.from_bytes(res.token[:8], "little"),
            layout=layout_to_proto(self.llm.kv_cache.layout()), model_fingerprint=self.llm.fingerprint,
            expires_in_s=res.lease_ends_at - res.created_at, lease_address=self.runtime.address)

    @map_errors
    async def Renew(self, request: pb.RenewRequest, context: grpc.aio.ServicerContext) -> pb.RenewResponse:
        remaining = self.reservations.renew(request.request_id, request.token)
        return pb.RenewResponse(found=remaining is not None, expires_in_s=remaining or 0.0)

    @map_errors
    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseResponse:
        freed = await self.reservations.release(request.request_id)
        assert self.runtime.engine is not None
        aborted = await self.runtime.engine.call(lambda e: e.abort_request(request.request_id))
        return pb.ReleaseResponse(found=bool(freed) or aborted, num_blocks_freed=freed)

    @map_stream_errors
    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext):
        async for msg in self._decode(request):
            yield msg

    async def DecodeStream(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        """Many requests over one stream (see the proto): each start runs `_decode` as its own task, and their
        outputs leave together, one DecodeBatch per turn of the event loop (so about one per engine step: the
        engine hands a step's outputs to the loop at once). The stream's end cancels every request on it."""
        outputs = OutputBatcher()
        tasks: dict[str, asyncio.Task] = {}
        reader = asyncio.create_task(self._read_stream(request_iterator, outputs, tasks))
        writer = asyncio.create_task(outputs.write_to(context))
        stopping = asyncio.create_task(self.runtime.wait())  # the worker is shutting down
        try:
            done, _ = await asyncio.wait({reader, writer, stopping}, return_when=asyncio.FIRST_COMPLETED)
            half_closed = reader in done and not reader.cancelled() and reader.exception() is None
            if writer not in done and (half_closed or stopping in done):
                # start nothing more (the router fails what it sent after this when the stream ends), finish
                # what runs (the server's stop grace bounds it), then flush and end the stream
                reader.cancel()
                if tasks:
                    await asyncio.wait(list(tasks.values()))
                outputs.close()
                await writer
        finally:
            for task in (*tasks.values(), reader, writer, stopping):
                task.cancel()

    async def _read_stream(self, request_iterator, outputs: OutputBatcher, tasks: dict[str, asyncio.Task]) -> None:
        async for req in request_iterator:
            op = req.WhichOneof("op")
            if op == "start":
                rid = req.start.request_id
                if rid in tasks:
                    outputs.fail(rid, grpc.StatusCode.INVALID_ARGUMENT, f"request_id {rid!r} is already running")
                    continue
                tasks[rid] = asyncio.create_task(self._stream_one(req.start, req.timeout_s, outputs, tasks))
            elif op == "cancel":
                task = tasks.pop(req.cancel, None)
                if task is not None:
                    task.cancel()

    async def _stream_one(self, request: pb.DecodeRequest, timeout_s: float, outputs: OutputBatcher,
                          tasks: dict[str, asyncio.Task]) -> None:
        """One request of a DecodeStream: `_decode`'s messages, or the status Decode would have ended with."""
        rid = request.request_id
        try:
            async with asyncio.timeout(timeout_s if timeout_s > 0 else None):
                async for msg in self._decode(request):
                    outputs.add(rid, msg)
        except TimeoutError:
            outputs.fail(rid, grpc.StatusCode.DEADLINE_EXCEEDED, f"[{rid}] deadline exceeded on the decode worker")
        except PdserveError as exc:
            outputs.fail(rid, grpc_status_of(exc), str(exc) or type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - the edge, as map_stream_errors
            logger.exception("[%s] DecodeStream request failed", rid)
            outputs.fail(rid, grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            if tasks.get(rid) is asyncio.current_task():
                del tasks[rid]

    async def _decode(self, request: pb.DecodeRequest):
        """A request's Decode messages (the same for Decode and DecodeStream)."""
        assert self.runtime.engine is not None
        req_id = request.request_id
        if not req_id:
            raise InvalidRequest("request_id is required")
        params = sampling_from_proto(request.sampling)
        prompt = check_token_ids(request.prompt_token_ids, self.llm.model_config.vocab_size)
        arrived_at = time.monotonic()
        prefix = None  # local prefills with a store: what was loaded from it
        hashes = check_block_hashes(prompt, request.block_hashes, self.llm.config.block_size, self.llm.fingerprint) \
            if request.block_hashes else None
        if request.prefilled:
            res = await self.reservations.admit(req_id)
            self.num_remote_prefills += 1
            first_lp = request.first_logprob if request.HasField("first_logprob") else None

            def add(e: LLMEngine):
                return e.connector.admit_prefilled(res.grant, prompt, request.first_token_id, params, first_lp,
                                                   request.num_cached_tokens, hashes or [])
            logger.debug("[%s] admitted with remote KV (%d prompt tokens)", req_id, len(prompt))
        else:
            self.num_local_prefills += 1
            logger.debug("[%s] prefilling locally (%d prompt tokens)", req_id, len(prompt))
            if self.store_prefix is not None:
                prefix = await self.store_prefix.load(
                    req_id, prompt, hashes or chain_block_hashes(prompt, self.llm.config.block_size, self.llm.fingerprint))

            # with a store, the blocks outlive a short request's finish until its prompt blocks are published
            # (after the first token went out), then the finally below releases them
            hold = prefix is not None and self.store_prefix.publish_enabled

            def add(e: LLMEngine):
                return e.add_request(req_id, prompt, params, block_hashes=hashes, keep_blocks=hold)

        landed_at = time.monotonic()  # remote prefills: the last KV bytes are in
        seqs = []  # the engine's Sequence, for its timestamps
        add_untimed = add

        def add(e: LLMEngine):  # noqa: F811
            seqs.append(add_untimed(e))
            return seqs[-1]

        first = True
        publish_prompt = False
        hold = not request.prefilled and prefix is not None and self.store_prefix.publish_enabled
        try:
            async for out in self.runtime.engine.generate(req_id, add):
                msg = pb.DecodeResponse(token_ids=out.new_token_ids, logprobs=out.new_logprobs or [],
                                        finish_reason=out.finish_reason or "")
                if first:
                    msg.num_cached_tokens = out.num_cached_tokens
                    first = False
                    first_out_at = time.monotonic()
                    if prefix is not None:  # admitted and computed: its blocks hold their own references now
                        self.store_prefix.release(prefix)
                        publish_prompt = True
                if out.finished and seqs:
                    msg.timing.CopyFrom(decode_timing(seqs[0], request.prefilled, arrived_at, landed_at, first_out_at))
                if not out.finished and self.publisher is not None and self.runtime.config.store_publish_hold_ms > 0 \
                        and self.publisher.has_unsettled(req_id):
                    # a block of this request is still being put: hold the token that starts the next one until
                    # it is stored, so a failover from here on recomputes only the last block
                    await self.publisher.wait_settled(req_id, self.runtime.config.store_publish_hold_ms / 1000)
                yield msg
                if publish_prompt:  # after the first token went out, so it never waits for this
                    publish_prompt = False
                    self.store_prefix.publish(prefix, await self._block_table(req_id))
        finally:
            if prefix is not None:
                self.store_prefix.release(prefix)
            if hold:
                self.runtime.engine.submit(lambda e: e.release(req_id) if req_id in e.requests else None)

    async def _block_table(self, req_id: str) -> list[int]:
        return await self.runtime.engine.call(
            lambda e: list(e.requests[req_id].block_table) if req_id in e.requests else [])

    @map_errors
    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.WorkerStats:
        return self.runtime.stats()

    def _add_stats(self, stats: pb.WorkerStats) -> None:
        stats.num_reserved_blocks = self.reservations.num_reserved_blocks
        stats.num_reservations = len(self.reservations.reservations)
        stats.num_local_prefills = self.num_local_prefills
        if self.store_prefix is not None:
            stats.store_hit_tokens += self.store_prefix.num_loaded_tokens
        stats.num_remote_prefills = self.num_remote_prefills
        stats.num_expired_reservations = self.reservations.num_expired
        stats.num_reservation_renewals = self.reservations.num_renewals
        if self.publisher is not None:
            stats.store_generated_blocks = self.publisher.stats.num_staged_blocks
            stats.store_generated_blocks_dropped = self.publisher.stats.num_dropped_blocks
            stats.store_publish_holds = self.publisher.stats.num_holds
            stats.store_publish_hold_seconds = self.publisher.stats.hold_seconds
            stats.store_publish_hold_timeouts = self.publisher.stats.num_hold_timeouts
        stats.num_requests_active += len(self.reservations.reservations)
