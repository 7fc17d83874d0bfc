"""The prefill worker's gRPC service: compute a prompt, push its KV to decode, return the first token."""

from __future__ import annotations

import dataclasses
import logging
import time

import grpc

from pdserve.convert import check_token_ids, sampling_from_proto
from pdserve.engine.block_hash import chain_block_hashes
from pdserve.errors import InvalidRequest
from pdserve.prefill.kv_sender import KVSender
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.rpc import map_errors
from pdserve.worker_runtime import WorkerRuntime

logger = logging.getLogger(__name__)


class PrefillServicer(pb_grpc.PrefillWorkerServicer):
    def __init__(self, runtime: WorkerRuntime, sender: KVSender) -> None:
        self.runtime = runtime
        self.sender = sender
        self.num_prefills = 0

    @map_errors
    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        engine = self.runtime.engine
        assert engine is not None
        llm = engine.engine
        req_id = request.request_id
        if not req_id:
            raise InvalidRequest("request_id is required")
        dest = request.destination
        if dest.model_fingerprint and dest.model_fingerprint != llm.fingerprint:
            raise InvalidRequest("model fingerprint mismatch: the destination serves another model")
        prompt = check_token_ids(request.prompt_token_ids, llm.model_config.vocab_size)
        if request.block_hashes:
            mine = chain_block_hashes(prompt, llm.config.block_size, llm.fingerprint)
            if list(request.block_hashes) != mine:
                raise InvalidRequest("block_hashes do not match the prompt (router and worker disagree on the model)")
        # Only the first token is sampled here; decode continues with the full parameters.
        params = dataclasses.replace(sampling_from_proto(request.sampling), max_tokens=1, min_tokens=0)
        t0 = time.monotonic()
        plan = self.sender.add(req_id, dest, len(prompt))
        first = None
        try:
            async for out in engine.generate_simple(req_id, prompt, params, keep_blocks=True):
                first = out
            t_compute = time.monotonic()
            await self.sender.wait(plan)
        finally:
            self.sender.remove(req_id)
            engine.submit(lambda e: e.release(req_id) if req_id in e.requests else None)
        assert first is not None and first.new_token_ids
        self.num_prefills += 1
        t_end = time.monotonic()
        logger.debug("[%s] prefilled %d tokens (%d cached) in %.1f ms, pushed %d bytes", req_id, len(prompt),
                     first.num_cached_tokens, 1e3 * (t_end - t0), plan.bytes_sent)
        resp = pb.PrefillResponse(first_token_id=first.new_token_ids[0], num_cached_tokens=first.num_cached_tokens,
                                  kv_bytes_sent=plan.bytes_sent, prefill_seconds=t_compute - t0,
                                  transfer_wait_seconds=t_end - t_compute)
        if first.new_logprobs:
            resp.first_logprob = first.new_logprobs[0]
        return resp

    @map_errors
    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.WorkerStats:
        stats = self.runtime.base_stats()
        stats.kv_bytes_sent = max(stats.kv_bytes_sent, self.sender.bytes_sent)
        stats.num_requests_active += len(self.sender.plans)
        return stats
