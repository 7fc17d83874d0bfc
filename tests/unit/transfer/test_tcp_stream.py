"""Pushes over plain TCP streams (transfer/tcp_stream.py), the UCX backend's path to peers without shared memory:
bytes land exactly, refused payloads are dropped and the stream stays usable, and a sender that vanishes mid-payload
fails only its expectation."""

from __future__ import annotations

import asyncio
import secrets
import socket

import numpy as np
import pytest

from pdserve.errors import KVTransferError
from pdserve.transfer.base import TransferRejected
from pdserve.transfer.tcp_stream import frame
from pdserve.transfer.wire import BodyWriter, Kind
from transfer_helpers import push_whole

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(60)]


async def _pair(**kwargs):
    from pdserve.transfer.ucx import UCXTransport

    kwargs = {"stream_pushes": True, **kwargs}  # opt-in (--transfer-direct-paths)
    sender = UCXTransport(timeout_s=5.0, shared_memory="off", **kwargs)
    receiver = UCXTransport(timeout_s=5.0, shared_memory="off", **kwargs)
    await sender.start()
    await receiver.start()
    return sender, receiver


async def test_push_to_a_peer_without_shared_memory_goes_over_a_stream_and_survives_a_rejection() -> None:
    sender, receiver = await _pair()
    try:
        src = np.random.default_rng(3).integers(0, 256, 12 << 20, dtype=np.uint8)
        dst = np.zeros_like(src)
        sender.register_buffer("src", src)
        receiver.register_buffer("dst", dst)
        with pytest.raises(TransferRejected):  # its payload is read and dropped, the stream stays usable
            await sender.push(receiver.address, secrets.token_bytes(16), "src", [(0, 1 << 20)], [(0, 1 << 20)])
        assert not dst.any()
        blocks = [(i * (1 << 20), 1 << 19) for i in range(12)]  # 12 regions that cannot merge, reversed
        token = secrets.token_bytes(16)
        exp = receiver.expect(token, "dst", blocks, 5.0)
        await sender.push(receiver.address, token, "src", blocks[::-1], blocks)
        await exp.wait()
        for (s, n), (d, _) in zip(blocks[::-1], blocks):
            assert np.array_equal(dst[d:d + n], src[s:s + n])
        assert list(sender._streams) == [receiver.address]
        assert receiver.stats.num_rejected == 1
    finally:
        await sender.close()
        await receiver.close()


async def test_stream_off_pushes_tagged() -> None:
    sender, receiver = await _pair(stream_pushes=False)
    try:
        src = np.arange(1 << 20, dtype=np.uint8)
        dst = await push_whole(sender, receiver, src)
        assert np.array_equal(dst, src) and not sender._streams
    finally:
        await sender.close()
        await receiver.close()


async def test_sender_gone_mid_payload_fails_the_expectation_and_the_receiver_serves_on() -> None:
    sender, receiver = await _pair()
    try:
        dst = np.zeros(4 << 20, dtype=np.uint8)
        receiver.register_buffer("dst", dst)
        port = receiver._server._streams.port  # the stream listener the receiver's HELLO_REPLY announces
        token = secrets.token_bytes(16)
        exp = receiver.expect(token, "dst", [(0, dst.nbytes)], 5.0)
        body = BodyWriter().blob(token).regions([(0, dst.nbytes)]).regions([(0, dst.nbytes)]).build()
        loop = asyncio.get_running_loop()
        raw = socket.socket()
        raw.setblocking(False)
        await loop.sock_connect(raw, ("127.0.0.1", port))
        await loop.sock_sendall(raw, frame(Kind.OPEN_STREAM, body) + b"\1" * (1 << 20))  # a quarter, then gone
        raw.close()
        with pytest.raises(KVTransferError):
            await asyncio.wait_for(exp.wait(), 10)
        # the receiver still takes pushes
        src = np.full(1 << 20, 7, dtype=np.uint8)
        sender.register_buffer("src", src)
        token = secrets.token_bytes(16)
        exp = receiver.expect(token, "dst", [(0, src.nbytes)], 5.0)
        await sender.push(receiver.address, token, "src", [(0, src.nbytes)], [(0, src.nbytes)])
        await exp.wait()
        assert (dst[:src.nbytes] == 7).all()
    finally:
        await sender.close()
        await receiver.close()
