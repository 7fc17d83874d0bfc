"""Decode reservations: prompt + headroom, a lease that renewals extend and whose end frees the blocks,
a hard deadline, and blocks back in the pool on every path (admit, release, lease end, failed KV).

The transport is a stand-in (unit test); tests/integration/test_reservation_lease.py runs the real one."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdserve.decode.reservations import ReservationTable
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.config import EngineConfig
from pdserve.engine.connector import WorkerConnector
from pdserve.engine.llm_engine import LLMEngine
from pdserve.errors import KVTransferError, NotFound


class FakeExpectation:
    def __init__(self, nbytes: int) -> None:
        self.nbytes, self.bytes_received = nbytes, 0
        self.event = asyncio.Event()
        self.error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.event.is_set()

    async def wait(self) -> None:
        await self.event.wait()
        if self.error is not None:
            raise self.error


class FakeTransport:
    def __init__(self) -> None:
        self.expectations: dict[bytes, FakeExpectation] = {}
        self.cancelled: list[bytes] = []

    def expect(self, token, buffer, regions, timeout_s):
        exp = self.expectations[token] = FakeExpectation(sum(n for _, n in regions))
        return exp

    async def cancel(self, token):
        self.cancelled.append(token)
        exp = self.expectations.get(token)
        if exp is not None and not exp.done:
            exp.error = KVTransferError("expectation cancelled")
            exp.event.set()

    def land(self, token):
        self.expectations[token].event.set()


@pytest.fixture
async def table(tiny_model_dir):
    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64)))
    engine.start()
    transport = FakeTransport()
    t = ReservationTable(engine, WorkerConnector(transport, engine.engine.kv_cache.layout()), lease_s=1.0,
                         max_s=3.0, headroom_tokens=32)
    t.fake = transport
    try:
        yield t
    finally:
        await t.release_all()
        await engine.stop()


def num_free(t: ReservationTable) -> int:
    return t.engine.engine.block_manager.num_free_blocks


async def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_reserves_prompt_plus_headroom_not_max_tokens(table):
    res = await table.reserve("a", num_prompt_tokens=50, max_tokens=900)
    assert len(res.block_ids) == 6 and res.grant.num_prompt_blocks == 4  # 50 + 32 tokens
    assert table.fake.expectations[res.token].nbytes == 4 * table.connector.layout.block_nbytes  # prompt only
    assert await table.release("a") == 6
    assert num_free(table) == 64 and res.token in table.fake.cancelled


async def test_lease_end_frees_blocks_and_renewals_keep_it(table):
    kept = await table.reserve("kept", 20, 4)
    lost = await table.reserve("lost", 20, 4)
    deadline = time.monotonic() + 2.5  # past two leases
    while time.monotonic() < deadline:
        assert table.renew("kept", kept.token) is not None
        await asyncio.sleep(0.1)
    await wait_for(lambda: "lost" not in table.reservations)
    assert "kept" in table.reservations and table.num_expired == 1
    assert table.renew("kept", b"x" * 16) is None  # only the token's holder may renew
    assert table.renew("lost", lost.token) is None
    table.fake.land(kept.token)
    admitted = await table.admit("kept")
    assert admitted.admitted and table.renew("kept", kept.token) is None
    table.engine.submit(lambda e: e.connector.free(admitted.grant.block_ids))
    await wait_for(lambda: num_free(table) == 64)


async def test_hard_deadline_ends_even_a_renewed_reservation(table):
    res = await table.reserve("a", 20, 4, timeout_s=0.5)
    deadline = time.monotonic() + 3.0
    while "a" in table.reservations and time.monotonic() < deadline:
        table.renew("a", res.token)
        await asyncio.sleep(0.05)
    assert "a" not in table.reservations
    await wait_for(lambda: num_free(table) == 64)


async def test_admit_waiting_when_the_lease_ends_fails_and_frees(table):
    await table.reserve("a", 20, 4)
    with pytest.raises(KVTransferError):
        await table.admit("a")  # nobody pushes or renews: the lease ends and cancels the wait
    await wait_for(lambda: num_free(table) == 64)
    with pytest.raises(NotFound):
        await table.admit("a")


async def test_failed_transfer_and_cancelled_admit_free_the_blocks(table):
    res = await table.reserve("a", 20, 4)
    table.fake.expectations[res.token].error = KVTransferError("peer died")
    table.fake.land(res.token)
    with pytest.raises(KVTransferError):
        await table.admit("a")
    assert num_free(table) == 64
    await table.reserve("b", 20, 4)
    waiter = asyncio.ensure_future(table.admit("b"))
    await asyncio.sleep(0.05)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    await wait_for(lambda: num_free(table) == 64 and not table.reservations)
