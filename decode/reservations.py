"""Decode-side KV reservations: blocks set aside for a request whose prompt KV a prefill worker will
write, each guarded by a one-time transfer token and a lease.

A reservation holds the prompt's blocks plus a bounded headroom (`reserve_headroom_tokens`); the
sequence takes more blocks as it generates (engine/scheduler.py), so max_tokens no longer sizes it.
Its first lease covers the hop to the prefill worker; from then on that prefill renews it while it
queues and computes (Renew), so a queued request never loses it and a dead prefill strands it for at
most one lease. A hard deadline (the router's hop timeout, at most `reservation_max_s`) bounds it in
all. It ends in exactly one of three ways: admitted (the sequence takes its blocks), released (router
said so), or expired (lease or deadline passed); every way frees what it must. Blocks are reached only
through the engine connector (engine/connector.py).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from dataclasses import dataclass, field

from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.connector import BlockGrant, WorkerConnector
from pdserve.errors import KVTransferError, KVTransferTimeout, NotFound, Overloaded
from pdserve.transfer.base import ExpectationHandle

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Reservation:
    req_id: str
    grant: BlockGrant
    token: bytes
    num_prompt_tokens: int
    lease_ends_at: float  # time.monotonic(): freed then unless renewed
    deadline: float  # time.monotonic(): freed then whatever happens
    expectation: ExpectationHandle
    expiry: asyncio.TimerHandle | None = None
    admitted: bool = False
    num_renewals: int = 0
    created_at: float = field(default_factory=time.monotonic)

    @property
    def block_ids(self) -> list[int]:
        return list(self.grant.block_ids)


class ReservationTable:
    def __init__(self, engine: AsyncEngine, connector: WorkerConnector, lease_s: float, *,
                 max_s: float = 600.0, headroom_tokens: int = 256) -> None:
        if lease_s <= 0 or max_s < lease_s or headroom_tokens < 1:
            raise ValueError("need lease_s > 0, max_s >= lease_s and headroom_tokens >= 1")
        self.engine = engine
        self.connector = connector
        self.lease_s = lease_s
        self.max_s = max_s
        self.headroom_tokens = headroom_tokens
        self.reservations: dict[str, Reservation] = {}  # req_id -> reservation awaiting its KV
        self.num_expired = 0
        self.num_renewals = 0

    @property
    def num_reserved_blocks(self) -> int:
        return sum(len(r.grant.block_ids) for r in self.reservations.values())

    async def reserve(self, req_id: str, num_prompt_tokens: int, max_tokens: int,
                      timeout_s: float | None = None) -> Reservation:
        """`timeout_s` (the caller's hop deadline) bounds the whole reservation; its lease is shorter."""
        if req_id in self.reservations:
            raise Overloaded(f"request {req_id!r} already holds a reservation")
        total_s = min(timeout_s or self.max_s, self.max_s)
        grant = await self.engine.call(
            lambda e: e.connector.reserve(req_id, num_prompt_tokens, max_tokens, self.headroom_tokens))
        token = secrets.token_bytes(16)
        try:
            expectation = self.connector.expect_load(token, grant, total_s)
        except BaseException:
            self.engine.submit(lambda e: e.connector.free(grant.block_ids))
            raise
        now = time.monotonic()
        res = Reservation(req_id, grant, token, num_prompt_tokens, now + min(self.lease_s, total_s), now + total_s,
                          expectation)
        self.reservations[req_id] = res
        self._arm(res)
        logger.debug("[%s] reserved %d blocks (%d for the prompt)", req_id, len(grant.block_ids),
                     grant.num_prompt_blocks)
        return res

    def renew(self, req_id: str, token: bytes) -> float | None:
        """Extend the lease of a reservation still waiting for its KV; returns the seconds it now has, or None
        (unknown, wrong token, already admitted or expired)."""
        res = self.reservations.get(req_id)
        if res is None or res.admitted or not hmac.compare_digest(res.token, token):
            return None
        now = time.monotonic()
        res.lease_ends_at = min(now + self.lease_s, res.deadline)
        res.num_renewals += 1
        self.num_renewals += 1
        self._arm(res)
        return res.lease_ends_at - now

    def _arm(self, res: Reservation) -> None:
        if res.expiry is not None:
            res.expiry.cancel()
        delay = max(0.0, res.lease_ends_at - time.monotonic())
        res.expiry = asyncio.get_running_loop().call_later(delay, self._expire, res.req_id, res.token)

    async def admit(self, req_id: str) -> Reservation:
        """Wait (bounded by the reservation's deadline; its lease expiry cancels the wait) until all prompt KV
        has landed; the caller then owns the grant and must hand it to a sequence or free it."""
        res = self.reservations.get(req_id)
        if res is None:
            raise NotFound(f"no reservation for request {req_id!r} (expired or released?)")
        try:
            await asyncio.wait_for(res.expectation.wait(), max(0.0, res.deadline - time.monotonic()) + 1.0)
        except asyncio.TimeoutError as exc:
            await self.release(req_id)
            raise KVTransferTimeout(f"[{req_id}] prompt KV did not arrive before the reservation expired") from exc
        except (KVTransferError, asyncio.CancelledError):
            await self.release(req_id)
            raise
        if self.reservations.get(req_id) is not res:
            raise KVTransferTimeout(f"[{req_id}] the reservation ended while its KV was landing")
        self.reservations.pop(req_id)
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
        # The transport guarantees no byte lands after cancel() returns, so the blocks are free to reuse.
        await self.connector.cancel(res.token)
        await self.engine.call(lambda e: e.connector.free(res.grant.block_ids))
        logger.debug("[%s] released reservation (%d blocks)", req_id, len(res.grant.block_ids))
        return len(res.grant.block_ids)

    def _expire(self, req_id: str, token: bytes) -> None:
        res = self.reservations.get(req_id)
        if res is None or res.admitted or res.token != token:
            return
        self.num_expired += 1
        reason = "its prefill stopped renewing it" if res.num_renewals else "no prefill renewed it"
        logger.warning("[%s] reservation lease ended (%s); freeing %d blocks", req_id, reason, len(res.grant.block_ids))
        asyncio.get_running_loop().create_task(self.release(req_id))

    async def release_all(self) -> None:
        for req_id in list(self.reservations):
            await self.release(req_id)
