"""KV transfers into a decode worker are authorised by the reservation's one-time token: a foreign
token, a write outside the reservation, a push after release or expiry, and a replayed push are
all rejected before a byte is received, and the reservation is left intact (the rightful push
still lands) or freed on time. Uses a UCXTransport of its own against a real decode worker.
"""

from __future__ import annotations

import asyncio
import secrets

import numpy as np
import pytest
import pytest_asyncio

from integration_helpers import all_blocks_free, wait_until
from pdserve import rpc
from pdserve.client import Client
from pdserve.convert import layout_from_proto
from pdserve.errors import KVTransferError
from pdserve.transfer.ucx import UCXTransport
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

# ucxx's context (and its notifier thread) is bound to the first event loop that uses it: one loop for the session.
pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(120)]

SRC = "src"
NUM_PROMPT_TOKENS = 40  # 3 blocks of 16


class Decode:
    """One reservation at a time on a real decode worker, and the byte regions it expects."""

    def __init__(self, stub: pb_grpc.DecodeWorkerStub, fingerprint: bytes) -> None:
        self.stub = stub
        self.fingerprint = fingerprint

    async def reserve(self, req_id: str, timeout_s: float = 10.0) -> pb.TransferDescriptor:
        return await self.stub.Reserve(pb.ReserveRequest(request_id=req_id, num_prompt_tokens=NUM_PROMPT_TOKENS,
                                                         max_tokens=4, model_fingerprint=self.fingerprint,
                                                         timeout_s=timeout_s), timeout=10)

    async def release(self, req_id: str) -> pb.ReleaseResponse:
        return await self.stub.Release(pb.ReleaseRequest(request_id=req_id), timeout=10)

    async def stats(self) -> pb.WorkerStats:
        return await self.stub.Stats(pb.StatsRequest(), timeout=5)


def _regions(desc: pb.TransferDescriptor, layers: range | None = None, block_ids: list[int] | None = None):
    lay = layout_from_proto(desc.layout)
    num_prompt_blocks = -(-NUM_PROMPT_TOKENS // lay.block_size)
    blocks = block_ids if block_ids is not None else list(desc.block_ids[:num_prompt_blocks])
    return lay.regions(blocks, layers)


async def _push(agent: UCXTransport, desc: pb.TransferDescriptor, token: bytes, dst) -> int:
    src, offset = [], 0
    for _, nbytes in dst:
        src.append((offset, nbytes))
        offset += nbytes
    return await agent.push(desc.transfer_address, token, SRC, src, dst, timeout_s=10)


@pytest.fixture(scope="session", autouse=True)
def _stop_ucxx_notifier_at_session_end():
    """ucxx's notifier thread is not a daemon: without stopping it the test process never exits."""
    yield
    from pdserve.transfer.ucx_env import import_ucxx

    import_ucxx().stop_notifier_thread()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def setup(disagg_cluster):
    agent = UCXTransport("127.0.0.1", 0, num_lanes=1, timeout_s=10)
    await agent.start()
    agent.register_buffer(SRC, np.full(64 << 20, 0x5A, dtype=np.uint8))
    decode_proc = next(p for p in disagg_cluster.procs if p.name.startswith("decode-"))
    channel = rpc.channel(decode_proc.address)
    try:
        async with Client(disagg_cluster.router_address) as client:
            info = await client.model_info()
            yield agent, Decode(pb_grpc.DecodeWorkerStub(channel), info.fingerprint), client
            await wait_until(lambda: all_blocks_free(client), timeout_s=30, what="every block free")
    finally:
        await channel.close()
        await agent.close()


async def test_foreign_token_and_foreign_blocks_are_rejected_and_the_reservation_stays_intact(setup):
    agent, decode, _ = setup
    desc = await decode.reserve("xfer-foreign")
    try:
        with pytest.raises(KVTransferError):
            await _push(agent, desc, secrets.token_bytes(len(desc.token)), _regions(desc))
        # the right token, but a block outside the reservation
        outside = next(b for b in range(desc.layout.num_blocks) if b not in desc.block_ids)
        with pytest.raises(KVTransferError):
            await _push(agent, desc, desc.token, _regions(desc, block_ids=[outside]))
        assert (await decode.stats()).num_reservations == 1
        # nothing was claimed by the rejected pushes: the rightful push of every region still lands
        assert await _push(agent, desc, desc.token, _regions(desc)) > 0
    finally:
        released = await decode.release("xfer-foreign")
    assert released.num_blocks_freed == len(desc.block_ids)


async def test_replayed_push_is_rejected(setup):
    agent, decode, _ = setup
    desc = await decode.reserve("xfer-replay")
    try:
        layer0 = _regions(desc, layers=range(1))
        assert await _push(agent, desc, desc.token, layer0) > 0
        with pytest.raises(KVTransferError):
            await _push(agent, desc, desc.token, layer0)  # the same bytes again under the same token
    finally:
        await decode.release("xfer-replay")


async def test_push_after_release_is_rejected(setup):
    agent, decode, _ = setup
    desc = await decode.reserve("xfer-late")
    before = await decode.stats()
    assert (await decode.release("xfer-late")).num_blocks_freed == len(desc.block_ids)
    with pytest.raises(KVTransferError):
        await _push(agent, desc, desc.token, _regions(desc))
    after = await decode.stats()
    assert after.num_reservations == 0
    assert after.num_free_kv_blocks == before.num_free_kv_blocks + len(desc.block_ids)


async def test_push_after_expiry_is_rejected_and_blocks_freed_by_the_worker(setup):
    agent, decode, _ = setup
    expired_before = (await decode.stats()).num_expired_reservations
    desc = await decode.reserve("xfer-expired", timeout_s=0.3)

    async def expired():
        s = await decode.stats()
        return s.num_expired_reservations > expired_before and s.num_reservations == 0
    await wait_until(expired, timeout_s=10, what="reservation expired by itself")
    with pytest.raises(KVTransferError):
        await _push(agent, desc, desc.token, _regions(desc))
    assert (await decode.release("xfer-expired")).found is False
    await asyncio.sleep(0)
