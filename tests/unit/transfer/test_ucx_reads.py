"""The UCX backend's batch of RMA reads (transfer/ucx_native.py): a push of many regions is one request and one reply,
the receiver posting one UCX GET per piece; a peer that does not offer reads gets tagged sends. Real ucxx, one process."""

from __future__ import annotations

import asyncio
import secrets

import numpy as np
import pytest

from pdserve.transfer.ucx import UCXTransport
from pdserve.transfer.ucx_native import ReadBatch, Ucp
from pdserve.transfer.ucx_env import import_ucxx

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(60)]

BUF_BYTES = 4 << 20


async def push_checkerboard(sender: UCXTransport, receiver: UCXTransport, count: int) -> tuple[np.ndarray, np.ndarray]:
    src = np.random.default_rng(1).integers(0, 256, BUF_BYTES, dtype=np.uint8)
    dst = np.zeros(BUF_BYTES, dtype=np.uint8)
    sender.register_buffer("src", src)
    receiver.register_buffer("dst", dst)
    regions = [(2 * i * 4096, 4096) for i in range(count)]
    dst_regions = regions[::-1]
    tok = secrets.token_bytes(16)
    exp = receiver.expect(tok, "dst", dst_regions, timeout_s=5)
    await sender.push(receiver.address, tok, "src", regions, dst_regions)
    await exp.wait()
    got = np.concatenate([dst[o:o + n] for o, n in dst_regions])
    want = np.concatenate([src[o:o + n] for o, n in regions])
    return got, want


@pytest.mark.parametrize("sender_reads,receiver_reads,expect_reads", [
    (True, True, True),  # both offer reads: one batch
    (False, True, False),  # the sender chose tagged sends
    (True, False, False),  # the receiver does not serve reads (HELLO says so): tagged sends
])
async def test_many_regions_move_as_one_batch_of_reads_when_both_offer_it(sender_reads, receiver_reads,
                                                                          expect_reads) -> None:
    sender = UCXTransport(rma_reads=sender_reads)
    receiver = UCXTransport(rma_reads=receiver_reads)
    await sender.start()
    await receiver.start()
    try:
        rma = Ucp.get(import_ucxx())
        assert rma is not None, "this ucxx build offers RMA"
        before = rma.posted
        got, want = await push_checkerboard(sender, receiver, 256)
        assert np.array_equal(got, want)
        assert rma.posted - before == (256 if expect_reads else 0)
        assert sender.stats.num_pushes == 1 and receiver.stats.num_served == 1
    finally:
        await sender.close()
        await receiver.close()


async def test_read_batch_aborts_the_lane_only_once_posting_stopped() -> None:
    """An endpoint must not go while a thread posts reads through it: abort() during posting is deferred."""
    loop = asyncio.get_running_loop()
    aborted: list[str] = []
    batch = ReadBatch(lambda: aborted.append("lane"), loop)
    batch.abort()
    assert batch.stop.is_set() and aborted == []  # still posting: deferred
    await asyncio.to_thread(batch.posted)
    await asyncio.sleep(0)
    assert aborted == ["lane"]
    done = ReadBatch(lambda: aborted.append("second"), loop)
    done.posted()
    done.abort()
    assert aborted == ["lane", "second"]  # posting over: at once
