"""The router's public gRPC service (Generate, Abort, GetModelInfo, ListWorkers) and worker registration."""

from __future__ import annotations

import asyncio
import logging
import uuid

import grpc

from pdserve.convert import sampling_from_proto
from pdserve.errors import DeadlineExceeded, InvalidRequest, PeerUnavailable
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.router.auth import ApiKeyAuth, Unauthenticated, grpc_peer_host, metadata_value
from pdserve.router.dispatch import Dispatcher
from pdserve.router.limits import FrontDoorLimits
from pdserve.router.registry import WorkerRegistry
from pdserve.rpc import map_errors, map_stream_errors

logger = logging.getLogger(__name__)

MAX_REQUEST_ID_LEN = 256


class RouterServicer(pb_grpc.RouterServicer):
    def __init__(self, dispatcher: Dispatcher, registry: WorkerRegistry, limits: FrontDoorLimits | None = None,
                 auth: ApiKeyAuth | None = None) -> None:
        self.dispatcher = dispatcher
        self.registry = registry
        self.auth = auth or ApiKeyAuth(registry.config.api_key)  # auth and limits are shared with the HTTP front end
        self.limits = limits or FrontDoorLimits(registry.config)

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> str | None:
        """UNAUTHENTICATED unless the call carries the API key (when one is set); returns its authorization."""
        authorization = metadata_value(context.invocation_metadata(), "authorization")
        try:
            self.auth.check(authorization)
        except Unauthenticated as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        return authorization

    @map_stream_errors
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        authorization = await self._authenticate(context)
        if request.ByteSize() > self.limits.max_request_bytes:  # RESOURCE_EXHAUSTED, as gRPC's own size cap
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the request is {request.ByteSize()} bytes; "
                                f"the limit is {self.limits.max_request_bytes}")
        if len(request.request_id) > MAX_REQUEST_ID_LEN:
            raise InvalidRequest(f"request_id is longer than {MAX_REQUEST_ID_LEN} characters")
        params = sampling_from_proto(request.sampling)
        which = request.WhichOneof("prompt")
        prompt_ids = self.dispatcher.prepare(
            request.text if which == "text" else None,
            list(request.token_ids.ids) if which == "token_ids" else None, params, request.model)
        self.limits.check_request(len(prompt_ids), params.max_tokens)
        req_id = request.request_id or f"req-{uuid.uuid4().hex[:16]}"
        with self.limits.stream(self.auth.client_key(authorization, grpc_peer_host(context.peer()))):
            stream = self.dispatcher.generate(prompt_ids, params, req_id=req_id, timeout_s=context.time_remaining(),
                                              detokenize=not request.skip_detokenize)
            try:
                async for ev in stream:
                    yield pb.GenerateResponse(request_id=req_id, token_ids=ev.token_ids, text=ev.text,
                                              logprobs=ev.logprobs, finish_reason=ev.finish_reason, usage=ev.usage,
                                              prefill_worker=ev.prefill_worker, decode_worker=ev.decode_worker,
                                              kv_bytes_moved=ev.kv_bytes_moved,
                                              timing=ev.timing if request.return_timing else None)
            except asyncio.TimeoutError as exc:
                raise DeadlineExceeded(f"[{req_id}] request deadline exceeded") from exc
            finally:
                await stream.aclose()

    @map_errors
    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        await self._authenticate(context)
        return pb.AbortResponse(found=self.dispatcher.abort(request.request_id))

    @map_errors
    async def GetModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        await self._authenticate(context)
        reason = self.registry.unready_reason()
        if reason:
            raise PeerUnavailable(f"not ready: {reason}")
        m = self.dispatcher.meta
        return pb.ModelInfo(name=m.name, max_model_len=m.max_model_len, vocab_size=m.vocab_size,
                            block_size=m.block_size, fingerprint=m.fingerprint, eos_token_id=m.eos_token_id)

    @map_errors
    async def ListWorkers(self, request: pb.ListWorkersRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ListWorkersResponse:
        await self._authenticate(context)
        if request.refresh:
            await self.registry.poll_all()  # each poll is bounded by its own timeout
        return pb.ListWorkersResponse(workers=[
            pb.WorkerInfo(worker_id=w.worker_id or w.address, role=w.role, address=w.address,
                          transfer_address=w.transfer_address, model_fingerprint=w.fingerprint, healthy=w.healthy,
                          stats=w.stats)
            for w in self.registry.workers.values()])

    @map_errors
    async def RegisterWorker(self, request: pb.RegisterWorkerRequest, context: grpc.aio.ServicerContext
                             ) -> pb.RegisterWorkerResponse:
        if not request.worker.address:
            raise InvalidRequest("worker.address is required")
        self.registry.register(request.worker)
        return pb.RegisterWorkerResponse(heartbeat_interval_s=max(1.0, self.registry.config.forget_after_s / 6))
