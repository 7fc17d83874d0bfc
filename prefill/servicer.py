"""The prefill worker's gRPC service: compute a prompt, push its KV to decode, return the first token.

Holds the destination's reservation lease from arrival to the last push (prefill/lease.py), loads
stored prefix blocks (store_prefix.py), pushes KV as chunks complete (kv_sender.py), and reaches the
engine's blocks only through its connector (engine/connector.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import grpc

from pdserve.convert import check_token_ids, sampling_from_proto
from pdserve.engine.block_hash import chain_block_hashes
from pdserve.errors import InvalidRequest, RequestAborted
from pdserve.engine.connector import check_block_hashes
from pdserve.prefill.kv_sender import KVSender
from pdserve.prefill.lease import LeaseKeeper
from pdserve.prefill.store_prefix import StorePrefix
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.rpc import map_errors
from pdserve.worker_runtime import WorkerRuntime

logger = logging.getLogger(__name__)


class PrefillServicer(pb_grpc.PrefillWorkerServicer):
    def __init__(self, runtime: WorkerRuntime, sender: KVSender, store_prefix: StorePrefix,
                 leases: LeaseKeeper) -> None:
        self.runtime = runtime
        self.sender = sender
        self.store_prefix = store_prefix
        self.leases = leases
        self.num_prefills = 0
        self._finishing: dict[str, asyncio.Task] = {}  # request id -> its transfer finishing after the response
        runtime.stats_parts.append(self._add_stats)

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
        # hashed once, by the router; checked at O(1) cost (engine/connector.py says why that suffices)
        hashes = check_block_hashes(prompt, request.block_hashes, llm.config.block_size, llm.fingerprint) \
            if request.block_hashes else chain_block_hashes(prompt, llm.config.block_size, llm.fingerprint)
        # Only the first token is sampled here; decode continues with the full parameters.
        params = dataclasses.replace(sampling_from_proto(request.sampling), max_tokens=1, min_tokens=0)
        t0 = time.monotonic()
        stale = self._finishing.get(req_id)
        if stale is not None:
            # A retry reuses the request id only after the router gave up on the earlier attempt (its
            # decode worker died, so that transfer can only fail): stop it and free its blocks first.
            logger.info("[%s] retry while the previous attempt's transfer is still finishing: cancelling it", req_id)
            stale.cancel()
            await asyncio.gather(stale, return_exceptions=True)
        plan = self.sender.add(req_id, dest, len(prompt))
        first = None
        handed_off = False
        prefix = None

        def lease_lost() -> None:  # decode dropped the reservation: stop computing for it
            if not handed_off:
                engine.submit(lambda e: e.abort_request(req_id))

        # renew the destination's reservation from now (queued included) until the last push is done
        lease = self.leases.keep(req_id, dest, lease_lost)
        try:
            prefix = await self.store_prefix.load(req_id, prompt, hashes)
            async for out in engine.generate_simple(req_id, prompt, params, keep_blocks=True, block_hashes=hashes):
                first = out
            self.store_prefix.release(prefix)
            finished = await engine.call(lambda e: e.connector.request_finished(req_id))
            if finished is None or first is None or not first.new_token_ids:
                raise RequestAborted(f"[{req_id}] prefill ended without a first token (aborted)")
            compute_s = finished.compute_s
            queue_s = max(0.0, (finished.first_scheduled_at or t0) - t0)  # the store prefix load included
            if self.sender.granularity == "request":
                self.sender.push_all(plan, list(finished.block_ids))
            self.store_prefix.publish(prefix, list(finished.block_ids))
            # Answer now; the last pushes drain in the background. Decode admits the request only
            # once every byte has landed, so the first token need not wait for the transfer tail.
            task = asyncio.create_task(self._finish_transfer(req_id, plan, t0, lease))
            self._finishing[req_id] = task
            task.add_done_callback(lambda t: self._finishing.pop(req_id, None) if self._finishing.get(req_id) is t
                                   else None)
            handed_off = True
        finally:
            if prefix is not None:
                self.store_prefix.release(prefix)
            if not handed_off:
                if lease is not None:
                    lease.cancel()
                self.sender.remove(req_id)
                engine.submit(lambda e: e.connector.release(req_id))
        self.num_prefills += 1
        # compute time only (queueing excluded): the router's TTFT predictor learns seconds per token from it
        # the KV this request moves: every prompt block, all layers (the pushes may still be draining)
        layout = llm.kv_cache.layout()
        kv_bytes = -(-len(prompt) // layout.block_size) * layout.num_layers * layout.layer_block_nbytes
        resp = pb.PrefillResponse(first_token_id=first.new_token_ids[0], num_cached_tokens=first.num_cached_tokens,
                                  prefill_seconds=compute_s, queue_seconds=queue_s, kv_bytes_sent=kv_bytes)
        if first.new_logprobs:
            resp.first_logprob = first.new_logprobs[0]
        return resp

    async def _finish_transfer(self, req_id: str, plan, t0: float, lease: asyncio.Task | None) -> None:
        """Wait (bounded) for a request's pushes, then stop renewing and free its blocks, whatever happened."""
        engine = self.runtime.engine
        assert engine is not None
        try:
            await self.sender.wait(plan)
            logger.debug("[%s] KV pushed: %d bytes, %.1f ms after the request arrived", req_id, plan.bytes_sent,
                         1e3 * (time.monotonic() - t0))
        except Exception as exc:  # noqa: BLE001 - decode's reservation times out; the router retries
            logger.warning("[%s] KV transfer to %s failed: %s", req_id, plan.dest.transfer_address, exc)
        finally:
            if lease is not None:
                lease.cancel()
            self.sender.remove(req_id)
            engine.submit(lambda e: e.connector.release(req_id))

    @map_errors
    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.WorkerStats:
        return self.runtime.stats()

    def _add_stats(self, stats: pb.WorkerStats) -> None:
        stats.kv_bytes_sent = max(stats.kv_bytes_sent, self.sender.bytes_sent)
        stats.num_requests_active += len(self.sender.plans)
        stats.store_hit_tokens += self.store_prefix.num_loaded_tokens
