"""Pushes a prefill's KV to its decode worker while the rest of the prompt still computes.

The engine thread calls `on_layer(layer, batch)` after each layer of each step; for every
request with a destination it queues a push of the newly completed blocks onto the asyncio loop:
each layer's as soon as it is written (`layer`), or all layers of a chunk once the chunk's last
layer is written, overlapping the next chunk's compute (`chunk`, the default: on a small CPU host
a round trip per layer costs more than it overlaps; docs/benchmarks.md). Pushes of one request run
in order; `wait` returns when all have landed. Regions come from the pools' block-major layouts
(`KVCacheLayout.regions`): a chunk or request push is one region per run of consecutive blocks on
each side, whatever the layer count; a layer push is that layer's K and V of each block (one region
per block: many small sends, worth it only where a round trip is much cheaper than a layer's compute).
Decides which blocks go where; the transfer layer only moves the bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from pdserve.convert import layout_from_proto
from pdserve.engine.connector import SaveMeta, WorkerConnector
from pdserve.engine.kv_cache import KVCacheLayout, PagedKVCache
from pdserve.engine.scheduler import ScheduledSeq
from pdserve.errors import InvalidRequest, KVTransferError, KVTransferTimeout
from pdserve.proto import pdserve_pb2 as pb
from pdserve.transfer.memory import record_ready_event, wait_ready_event

logger = logging.getLogger(__name__)



@dataclass
class PushPlan:
    req_id: str
    dest: pb.TransferDescriptor
    dest_layout: KVCacheLayout
    num_prompt_tokens: int
    num_pushed_blocks: int = 0  # prompt blocks whose every layer has been queued
    step_range: tuple[int, int] = (0, 0)
    chain: asyncio.Future | None = None  # completes when every queued push has
    bytes_sent: int = 0
    error: BaseException | None = None
    last_push_done: float = 0.0


class KVSender:
    def __init__(self, connector: WorkerConnector, kv_cache: PagedKVCache, loop: asyncio.AbstractEventLoop,
                 timeout_s: float, granularity: str = "chunk") -> None:
        if granularity not in ("layer", "chunk", "request"):
            raise ValueError(f"granularity must be layer, chunk or request, got {granularity!r}")
        self.connector = connector
        self.kv = kv_cache
        self.loop = loop
        self.timeout_s = timeout_s
        # layer: a push per layer per chunk; chunk: one push per chunk (all layers) while the next
        # chunk computes; request: everything by push_all() after the last chunk.
        self.granularity = granularity
        self.plans: dict[str, PushPlan] = {}  # req_id -> plan, for requests being prefilled
        self.bytes_sent = 0

    def check_layout(self, dest: pb.TransferDescriptor, num_prompt_tokens: int) -> KVCacheLayout:
        theirs, mine = layout_from_proto(dest.layout), self.kv.layout()
        if not mine.compatible(theirs):
            raise InvalidRequest(f"destination KV layout {theirs} does not match this worker's {mine}")
        if len(dest.block_ids) < -(-num_prompt_tokens // mine.block_size):
            raise InvalidRequest(f"destination has {len(dest.block_ids)} blocks, too few for the prompt")
        if any(b >= theirs.num_blocks for b in dest.block_ids):
            raise InvalidRequest(f"destination block ids must be below its pool size {theirs.num_blocks}")
        return theirs

    def add(self, req_id: str, dest: pb.TransferDescriptor, num_prompt_tokens: int) -> PushPlan:
        dest_layout = self.check_layout(dest, num_prompt_tokens)
        plan = PushPlan(req_id, dest, dest_layout, num_prompt_tokens)
        plan.chain = self.loop.create_future()
        plan.chain.set_result(None)
        self.plans[req_id] = plan
        return plan

    def remove(self, req_id: str) -> None:
        self.plans.pop(req_id, None)

    # ---- engine thread ------------------------------------------------------------------------
    def on_layer(self, layer: int, batch: list[ScheduledSeq]) -> None:
        if self.granularity == "request":
            return
        last_layer = layer == self.kv.num_layers - 1
        if self.granularity == "chunk" and not (layer == 0 or last_layer):
            return
        for item in batch:
            plan = self.plans.get(item.seq.req_id)
            if plan is None:
                continue
            seq = item.seq
            if layer == 0:
                end_tokens = seq.num_computed_tokens + item.num_new_tokens
                if end_tokens >= plan.num_prompt_tokens:
                    end_block = -(-plan.num_prompt_tokens // self.kv.block_size)
                else:
                    end_block = end_tokens // self.kv.block_size
                plan.step_range = (plan.num_pushed_blocks, end_block)
            start, end = plan.step_range
            if end > start and self.granularity == "layer":
                meta = self._save_meta(plan, seq.block_table, start, end, range(layer, layer + 1))
                self.loop.call_soon_threadsafe(self._queue_push, plan, meta, record_ready_event(self.kv.kv))
            elif end > start and last_layer:  # chunk: every layer of this step's blocks at once
                meta = self._save_meta(plan, seq.block_table, start, end)
                self.loop.call_soon_threadsafe(self._queue_push, plan, meta, record_ready_event(self.kv.kv))
            if last_layer:
                plan.num_pushed_blocks = end

    def _save_meta(self, plan: PushPlan, block_table: list[int], start: int, end: int,
                   layers: range | None = None) -> SaveMeta:
        """Prompt blocks [start, end) (all layers, or `layers`) into the matching destination blocks."""
        return SaveMeta(plan.req_id, plan.dest.transfer_address, plan.dest.token, plan.dest_layout,
                        tuple(block_table[start:end]), tuple(plan.dest.block_ids[start:end]), layers)

    # ---- event loop -------------------------------------------------------------------------
    def push_all(self, plan: PushPlan, block_table: list[int]) -> None:
        """Queue every not-yet-pushed prompt block, all layers at once (the `request` granularity)."""
        start, end = plan.num_pushed_blocks, -(-plan.num_prompt_tokens // self.kv.block_size)
        if end <= start:
            return
        meta = self._save_meta(plan, block_table, start, end)
        plan.num_pushed_blocks = end
        self._queue_push(plan, meta, record_ready_event(self.kv.kv))

    def _queue_push(self, plan: PushPlan, meta: SaveMeta, ready: object | None) -> None:
        """`ready`: on a GPU, the CUDA event recorded right after the pushed KV was written (None on the CPU)."""
        previous = plan.chain

        async def push() -> None:
            await previous
            if plan.error is not None:
                return
            try:
                await wait_ready_event(ready, self.timeout_s)  # the bytes must be on the device before they move
                sent = await self.connector.save(meta, self.timeout_s)
            except Exception as exc:  # noqa: BLE001 - recorded, raised by wait()
                plan.error = exc
                logger.warning("[%s] KV push failed: %s", plan.req_id, exc)
                return
            plan.bytes_sent += sent
            self.bytes_sent += sent
            plan.last_push_done = time.monotonic()

        plan.chain = asyncio.ensure_future(push())

    async def wait(self, plan: PushPlan) -> None:
        """Until every queued push of `plan` has landed; raises the first push error."""
        assert plan.chain is not None
        try:
            await asyncio.wait_for(asyncio.shield(plan.chain), self.timeout_s)
        except asyncio.TimeoutError as exc:
            raise KVTransferTimeout(f"[{plan.req_id}] KV push did not finish in {self.timeout_s} s") from exc
        if plan.error is not None:
            if isinstance(plan.error, KVTransferError):
                raise plan.error
            raise KVTransferError(f"[{plan.req_id}] KV push failed: {plan.error}") from plan.error
