"""Decode-side KV reservations: blocks set aside for a request whose prompt KV a prefill worker
will write, each guarded by a one-time transfer token and an expiry.

A reservation ends in exactly one of three ways: admitted (the sequence takes its blocks),
released (router said so), or expired (nobody came in time); every way frees what it must.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field

from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.llm_engine import LLMEngine
from pdserve.errors import KVTransferError, KVTransferTimeout, NotFound, Overloaded
from pdserve.transfer.base import ExpectationHandle, KVTransport

logger = logging.getLogger(__name__)

KV_BUFFER = "kv"


@dataclass(slots=True)
class Reservation:
    req_id: str
    block_ids: list[int]
    token: bytes
    num_prompt_tokens: int
    expires_at: float  # time.monotonic()
    expectation: ExpectationHandle
    expiry: asyncio.TimerHandle | None = None
    admitted: bool = False
    created_at: float = field(default_factory=time.monotonic)


class ReservationTable:
    def __init__(self, engine: AsyncEngine, transport: KVTransport, timeout_s: float) -> None:
        self.engine = engine
        self.transport = transport
        self.timeout_s = timeout_s
        self.reservations: dict[str, Reservation] = {}  # req_id -> reservation awaiting its KV
        self.num_expired = 0

    @property
    def num_reserved_blocks(self) -> int:
        return sum(len(r.block_ids) for r in self.reservations.values())

    async def reserve(self, req_id: str, num_prompt_tokens: int, max_tokens: int,
                      timeout_s: float | None = None) -> Reservation:
        if req_id in self.reservations:
            raise Overloaded(f"request {req_id!r} already holds a reservation")
        timeout_s = min(timeout_s or self.timeout_s, self.timeout_s)

        def allocate(e: LLMEngine) -> list[int]:
            e.validate([0] * num_prompt_tokens, _LengthOnly(max_tokens))
            if req_id in e.requests:
                raise Overloaded(f"request {req_id!r} is already running here")
            n = e.block_manager.blocks_for_tokens(num_prompt_tokens + max_tokens)
            if n > e.block_manager.num_free_blocks:
                raise Overloaded(f"decode worker has {e.block_manager.num_free_blocks} free KV blocks, "
                                 f"request needs {n}")
            return e.block_manager.allocate(n)

        block_ids = await self.engine.call(allocate)
        kv = self.engine.engine.kv_cache
        num_prompt_blocks = kv.block_size and -(-num_prompt_tokens // kv.block_size)
        token = secrets.token_bytes(16)
        try:
            expectation = self.transport.expect(token, KV_BUFFER, kv.regions(block_ids[:num_prompt_blocks]), timeout_s)
        except BaseException:
            self.engine.submit(lambda e: e.block_manager.free(block_ids))
            raise
        res = Reservation(req_id, block_ids, token, num_prompt_tokens, time.monotonic() + timeout_s, expectation)
        res.expiry = asyncio.get_running_loop().call_later(timeout_s, self._expire, req_id)
        self.reservations[req_id] = res
        logger.debug("[%s] reserved %d blocks", req_id, len(block_ids))
        return res

    async def admit(self, req_id: str) -> Reservation:
        """Wait (bounded by the reservation's expiry) until all prompt KV has landed; the caller
        then owns the blocks and must hand them to a sequence or free them."""
        res = self.reservations.get(req_id)
        if res is None:
            raise NotFound(f"no reservation for request {req_id!r} (expired or released?)")
        try:
            await asyncio.wait_for(res.expectation.wait(), max(0.0, res.expires_at - time.monotonic()) + 1.0)
        except asyncio.TimeoutError as exc:
            await self.release(req_id)
            raise KVTransferTimeout(f"[{req_id}] prompt KV did not arrive before the reservation expired") from exc
        except KVTransferError:
            await self.release(req_id)
            raise
        except asyncio.CancelledError:
            await self.release(req_id)
            raise
        self.reservations.pop(req_id, None)
        if res.expiry is not None:
            res.expiry.cancel()
        res.admitted = True
        return res

    async def release(self, req_id: str) -> int:
        """Drop a reservation; returns the blocks freed (0 if there was none)."""
        res = self.reservations.pop(req_id, None)
        if res is None:
            return 0
        if res.expiry is not None:
            res.expiry.cancel()
        await self.transport.cancel(res.token)
        # The transport guarantees no byte lands after cancel() returns, so the blocks are free to reuse.
        await self.engine.call(lambda e: e.block_manager.free(res.block_ids))
        logger.debug("[%s] released reservation (%d blocks)", req_id, len(res.block_ids))
        return len(res.block_ids)

    def _expire(self, req_id: str) -> None:
        res = self.reservations.get(req_id)
        if res is None or res.admitted:
            return
        self.num_expired += 1
        logger.warning("[%s] reservation expired before its KV arrived; freeing %d blocks", req_id, len(res.block_ids))
        asyncio.get_running_loop().create_task(self.release(req_id))

    async def release_all(self) -> None:
        for req_id in list(self.reservations):
            await self.release(req_id)


class _LengthOnly:
    """Just enough of SamplingParams for LLMEngine.validate's length checks."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
