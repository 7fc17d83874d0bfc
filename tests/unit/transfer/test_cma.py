"""Same-host CMA reads (transfer/cma.py) and the UCX backend's OPEN_CMA path that uses them: bytes land exactly, a
dead or unreadable peer fails the read (never the reader), and device destinations fall back to tagged sends."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import subprocess
import sys
import threading

import numpy as np
import pytest

from pdserve.errors import KVTransferError
from pdserve.transfer.cma import IOV_MAX, Cma, _advance
from transfer_helpers import push_whole

cma = Cma.get()
needs_cma = pytest.mark.skipif(cma is None, reason="process_vm_readv is not available")


def addr(a: np.ndarray, offset: int = 0) -> int:
    return int(a.ctypes.data) + offset


@needs_cma
def test_read_many_regions_lands_exact_bytes() -> None:
    src = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8)
    dst = np.zeros_like(src)
    regions = [(i * 2048, 1000 + i % 7) for i in range(3 * IOV_MAX + 5)]  # more than one call's worth of regions
    reads = [(addr(dst, o), addr(src, (o * 7) % (6 << 20)), n) for o, n in regions]
    before = cma.calls
    cma.read(os.getpid(), reads)
    assert cma.calls - before == 4  # ceil(3077 / 1024) calls, no short reads
    for o, n in regions:
        s = (o * 7) % (6 << 20)
        assert np.array_equal(dst[o:o + n], src[s:s + n])


@needs_cma
def test_stop_flag_stops_a_read_between_chunks() -> None:
    src = np.ones(1 << 20, dtype=np.uint8)
    dst = np.zeros_like(src)
    stop = threading.Event()
    stop.set()
    with pytest.raises(KVTransferError, match="aborted"):
        cma.read(os.getpid(), [(addr(dst), addr(src), src.nbytes)], stop)
    assert not dst.any()


@needs_cma
def test_dead_or_missing_process_fails_the_read_not_the_reader() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    child.kill()
    child.wait()
    dst = np.zeros(4096, dtype=np.uint8)
    with pytest.raises(KVTransferError, match=f"process {child.pid}"):
        cma.read(child.pid, [(addr(dst), 0x10000, 4096)])
    with pytest.raises(KVTransferError):  # a bad address in a live process
        cma.read(os.getpid(), [(addr(dst), 8, 4096)])


@needs_cma
def test_probe_compares_the_bytes_read() -> None:
    probe = np.frombuffer(secrets.token_bytes(16), dtype=np.uint8).copy()
    assert cma.probe(os.getpid(), addr(probe), probe.tobytes())
    assert not cma.probe(os.getpid(), addr(probe), secrets.token_bytes(16))
    assert not cma.probe(0, addr(probe), probe.tobytes())
    assert not cma.probe(os.getpid(), 8, probe.tobytes())  # unreadable address: False, not an error


def test_advance_skips_transferred_bytes() -> None:
    iov = np.array([[100, 10], [200, 20], [300, 30]], dtype=np.uint64)
    assert _advance(iov, 10).tolist() == [[200, 20], [300, 30]]
    assert _advance(iov, 15).tolist() == [[205, 15], [300, 30]]
    assert _advance(iov, 59).tolist() == [[329, 1]]


# ---- the UCX backend over CMA --------------------------------------------------------------------------------------
pytestmark_async = pytest.mark.asyncio(loop_scope="session")


async def _pair(**kwargs):
    from pdserve.transfer.ucx import UCXTransport

    kwargs = {"cma_reads": True, **kwargs}  # opt-in (--transfer-direct-paths)
    sender, receiver = UCXTransport(timeout_s=5.0, **kwargs), UCXTransport(timeout_s=5.0, **kwargs)
    await sender.start()
    await receiver.start()
    return sender, receiver


@needs_cma
@pytestmark_async
@pytest.mark.timeout(60)
@pytest.mark.parametrize("nbytes", [4096, 4 << 20, 40 << 20])  # inline on the loop, and on threads (> 8 MiB)
async def test_push_between_same_host_peers_moves_by_cma(nbytes) -> None:
    sender, receiver = await _pair()
    try:
        src = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8)
        dst = np.zeros_like(src)
        sender.register_buffer("src", src)
        receiver.register_buffer("dst", dst)
        half = nbytes // 2
        token = secrets.token_bytes(16)
        exp = receiver.expect(token, "dst", [(0, nbytes)], 5.0)
        await sender.push(receiver.address, token, "src", [(0, half)], [(half, half)])  # connects, learns caps
        before = cma.calls
        await sender.push(receiver.address, token, "src", [(half, half)], [(0, half)])
        assert cma.calls > before  # the second push was a CMA read
        assert not sender._channels[receiver.address].closed  # asked over the CMA channel, not a UCX lane
        await exp.wait()
        assert np.array_equal(dst[half:], src[:half]) and np.array_equal(dst[:half], src[half:])
    finally:
        await sender.close()
        await receiver.close()


@needs_cma
@pytestmark_async
@pytest.mark.timeout(60)
async def test_cma_off_or_shared_memory_off_pushes_tagged() -> None:
    for kwargs in (dict(cma_reads=False), dict(shared_memory="off")):
        sender, receiver = await _pair(**kwargs)
        try:
            src = np.arange(1 << 20, dtype=np.uint8)
            before = cma.calls
            dst = await push_whole(sender, receiver, src)
            assert cma.calls == before, kwargs
            assert np.array_equal(dst, src)
        finally:
            await sender.close()
            await receiver.close()


@needs_cma
@pytestmark_async
@pytest.mark.timeout(60)
async def test_device_destination_answers_unsupported_and_the_push_goes_tagged(monkeypatch) -> None:
    """A receiver whose buffer is device memory cannot CMA into it: it answers UNSUPPORTED before checking anything,
    and the sender pushes the same bytes tagged (simulated: the registry reports the host buffer as cuda:0)."""
    from pdserve.transfer.tokens import TokenRegistry

    original = TokenRegistry.expectation_memory

    def as_device(self, token):
        memory = original(self, token)
        return None if memory is None else dataclasses.replace(memory, device="cuda:0")

    monkeypatch.setattr(TokenRegistry, "expectation_memory", as_device)
    sender, receiver = await _pair()
    try:
        src = np.random.default_rng(2).integers(0, 256, 2 << 20, dtype=np.uint8)
        before = cma.calls
        dst = await push_whole(sender, receiver, src)
        assert np.array_equal(dst, src)
        assert cma.calls - before <= 1  # at most the connect-time probe; no payload read
        assert receiver.stats.num_rejected == 0
    finally:
        await sender.close()
        await receiver.close()


@needs_cma
@pytestmark_async
@pytest.mark.timeout(30)
async def test_channel_refuses_a_process_that_did_not_pass_the_probe_and_serves_one_that_did() -> None:
    from pdserve.transfer.cma_channel import Channel, ChannelServer
    from pdserve.transfer.wire import Kind

    async def serve(pid, kind, body):
        return Kind.DONE, body + str(pid).encode()

    allowed: set[int] = set()
    server = ChannelServer(serve, allowed.__contains__)
    name = await server.start()
    try:
        deadline = asyncio.get_running_loop().time() + 5
        refused = await Channel.connect(name, deadline)
        with pytest.raises(KVTransferError):
            await refused.request(Kind.OPEN_CMA, b"x", deadline)
        assert refused.closed
        allowed.add(os.getpid())
        channel = await Channel.connect(name, deadline)
        replies = await asyncio.gather(*(channel.request(Kind.OPEN_CMA, b"%d:" % i, deadline) for i in range(5)))
        assert replies == [(Kind.DONE, b"%d:%d" % (i, os.getpid())) for i in range(5)]  # matched by request id
        channel.close()
        with pytest.raises(KVTransferError):
            await channel.request(Kind.OPEN_CMA, b"x", deadline)
    finally:
        await server.close()
