"""Bridges the KV cache store and a worker's local prefix cache.

Before a prompt is admitted, `load` copies the longest stored prefix the local cache lacks into
fresh blocks and enters them into the local prefix-cache index, so the engine's ordinary prefix
matching serves them (no special path in the scheduler). After a prompt is computed, `publish`
hands its new full blocks to the store. Store faults only ever mean fewer hits (recompute). Blocks
are reached only through the engine connector's scheduler side (engine/connector.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.block_hash import BlockHash
from pdserve.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)


@dataclass
class PrefixPlan:
    hashes: list[BlockHash]  # chained hashes of the prompt's full blocks
    num_stored_blocks: int = 0  # leading blocks the store holds (known after lookup)
    held_block_ids: list[int] = field(default_factory=list)  # loaded blocks we hold a reference to
    num_loaded_tokens: int = 0


class StorePrefix:
    def __init__(self, engine: AsyncEngine, store, publish: bool = True) -> None:
        self.engine = engine
        self.store = store  # KVStoreClient or None
        self.publish_enabled = publish
        self.num_loaded_tokens = 0

    async def load(self, req_id: str, prompt: list[int], hashes: list[BlockHash]) -> PrefixPlan:
        """`hashes`: the prompt's chained block hashes (the router's, checked by the servicer)."""
        num_local = await self.engine.call(lambda e: e.connector.num_matched_blocks(hashes, len(prompt)))
        plan = PrefixPlan(hashes)
        if self.store is None:
            return plan
        bs = self.engine.engine.config.block_size
        cap = (len(prompt) - 1) // bs
        plan.num_stored_blocks = await self.store.lookup(hashes)
        want = hashes[num_local:min(cap, plan.num_stored_blocks)]
        if not want:
            return plan

        # leave room for the request itself: never let a store load starve the compute
        block_ids = await self.engine.call(lambda e: e.connector.allocate_for_load(len(want), len(prompt)))
        if not block_ids:
            return plan
        loaded = 0
        try:
            loaded = await self.store.load(want, block_ids)
        finally:
            def register(e: LLMEngine) -> None:
                e.connector.register_loaded(block_ids[:loaded], want[:loaded])
                e.connector.free(block_ids[loaded:])

            await self.engine.call(register)
        plan.held_block_ids = block_ids[:loaded]
        plan.num_loaded_tokens = loaded * bs
        self.num_loaded_tokens += plan.num_loaded_tokens
        logger.debug("[%s] loaded %d blocks from the store (%d were cached locally)", req_id, loaded, num_local)
        return plan

    def release(self, plan: PrefixPlan) -> None:
        """Drop the references `load` took (the request holds its own once admitted)."""
        if plan.held_block_ids:
            held, plan.held_block_ids = plan.held_block_ids, []
            self.engine.submit(lambda e: e.connector.free(held))

    def publish(self, plan: PrefixPlan, block_table: list[int]) -> None:
        """Give the store the prompt's full blocks it lacks (the store copies them synchronously)."""
        if self.store is None or not self.publish_enabled:
            return
        start = plan.num_stored_blocks
        end = min(len(plan.hashes), len(block_table))
        if end > start:
            self.store.publish(plan.hashes[start:end], block_table[start:end])
