"""The rules every KVTransport backend keeps (transfer/base.py), run against each real backend: two transports in one
process and one event loop on loopback, over real ucxx and over Mooncake's Transfer Engine (TCP)."""

from __future__ import annotations

import asyncio
import secrets

import numpy as np
import pytest
import pytest_asyncio
import torch

from pdserve.errors import InvalidRequest, KVTransferError, KVTransferTimeout, PeerUnavailable
from pdserve.transfer.base import KVTransport, TransferRejected

# ucxx's context (and its notifier thread) is bound to the first event loop that uses it: one loop for the session.
pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(60)]

BUF_BYTES = 8 << 20


def make_transport(backend: str, *, timeout_s: float = 5.0, small_pieces: bool = False) -> KVTransport:
    """A real transport of `backend`; small_pieces cuts pushes into 1 MiB pieces (and UCX spreads them over lanes).
    "ucx" pushes by CMA reads of the receiver (the default on one host), "ucx-tcp" over TCP streams (the default
    between hosts without RDMA; here shared memory off), "ucx-tagged" as tagged UCX messages, "ucx-reads" as one
    batch of UCX RMA reads by the receiver (opt-in)."""
    if backend in ("ucx", "ucx-tcp", "ucx-tagged", "ucx-reads"):
        from pdserve.transfer.ucx import UCXTransport

        pieces = dict(max_piece_bytes=1 << 20, lane_min_bytes=1 << 20) if small_pieces else {}
        return UCXTransport(num_lanes=3, timeout_s=timeout_s, rma_reads=backend == "ucx-reads",
                            cma_reads=backend == "ucx", stream_pushes=backend == "ucx-tcp",
                            shared_memory="off" if backend == "ucx-tcp" else "auto", **pieces)
    try:
        from pdserve.transfer.mooncake import MooncakeTransport, import_engine

        import_engine()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    return MooncakeTransport(timeout_s=timeout_s, **({"max_piece_bytes": 1 << 20} if small_pieces else {}))


@pytest_asyncio.fixture(loop_scope="session", scope="module", params=["ucx", "ucx-tcp", "ucx-tagged", "ucx-reads", "mooncake"])
async def agents(request):
    sender = make_transport(request.param, small_pieces=True)
    receiver = make_transport(request.param)
    await sender.start()
    await receiver.start()
    assert isinstance(sender, KVTransport) and sender.name == request.param.partition("-")[0]
    src = np.random.default_rng(0).integers(0, 256, BUF_BYTES, dtype=np.uint8)
    dst = np.zeros(BUF_BYTES, dtype=np.uint8)
    sender.register_buffer("src", src)
    receiver.register_buffer("dst", dst)
    try:
        yield sender, receiver, src, dst
    finally:
        await sender.close()
        await receiver.close()


def token() -> bytes:
    return secrets.token_bytes(16)


def gather_bytes(buf: np.ndarray, regions: list[tuple[int, int]]) -> np.ndarray:
    return np.concatenate([buf[o:o + n] for o, n in regions])


@pytest.mark.parametrize("src_regions,dst_regions", [
    ([(0, 1)], [(BUF_BYTES - 1, 1)]),
    ([(100, 4096), (10000, 4096)], [(8192, 8192)]),  # two runs into one
    ([(0, 1 << 20)], [(i * 65536 + 7, 65536) for i in range(16)]),  # one run into 16 blocks
    ([(i * 4096, 4096) for i in range(64)], [((1 << 20) + (i % 8) * 4096 + (i // 8) * 65536, 4096) for i in range(64)]),
    ([(0, 6 << 20)], [(1 << 20, 6 << 20)]),  # 1 MiB pieces (several lanes on UCX)
])
async def test_push_lands_exact_bytes(agents, src_regions, dst_regions) -> None:
    sender, receiver, src, dst = agents
    dst[:] = 0
    tok = token()
    exp = receiver.expect(tok, "dst", dst_regions, timeout_s=5)
    sent = await sender.push(receiver.address, tok, "src", src_regions, dst_regions)
    await exp.wait()
    assert sent == exp.nbytes == exp.bytes_received and exp.done
    assert np.array_equal(gather_bytes(dst, dst_regions), gather_bytes(src, src_regions))
    mask = np.ones(BUF_BYTES, dtype=bool)
    for o, n in dst_regions:
        mask[o:o + n] = False
    assert not dst[mask].any()  # nothing outside the regions changed


@pytest.mark.parametrize("order", ["descending", "interleaved"])
async def test_many_regions_that_cannot_merge_land_exact_bytes(agents, order) -> None:
    """A checkerboard of 4 KiB regions on both sides (no two adjacent), the destination in descending order or
    interleaved: one piece per region, every byte where it belongs, nothing else written."""
    sender, receiver, src, dst = agents
    dst[:] = 0
    count, size = 600, 4096
    src_regions = [(2 * i * size + 17, size) for i in range(count)]
    slots = list(range(count - 1, -1, -1)) if order == "descending" else [(i * 7) % count for i in range(count)]
    dst_regions = [((1 << 20) + 2 * slot * size + 1, size) for slot in slots]
    tok = token()
    exp = receiver.expect(tok, "dst", dst_regions, timeout_s=5)
    assert await sender.push(receiver.address, tok, "src", src_regions, dst_regions) == count * size
    await exp.wait()
    assert np.array_equal(gather_bytes(dst, dst_regions), gather_bytes(src, src_regions))
    mask = np.ones(BUF_BYTES, dtype=bool)
    for o, n in dst_regions:
        mask[o:o + n] = False
    assert not dst[mask].any()


async def test_many_region_push_with_one_foreign_region_is_rejected_untouched(agents) -> None:
    """One region outside the expectation among hundreds: the whole push is refused before any byte lands."""
    sender, receiver, src, dst = agents
    dst[:] = 0
    regions = [(2 * i * 4096, 4096) for i in range(300)]
    tok = token()
    exp = receiver.expect(tok, "dst", regions[:-1], timeout_s=5)
    with pytest.raises(TransferRejected):
        await sender.push(receiver.address, tok, "src", regions, regions)
    assert not dst.any() and exp.bytes_received == 0
    await receiver.cancel(tok)


async def test_one_push_per_layer_under_one_token(agents) -> None:
    sender, receiver, src, dst = agents
    layers = [[(layer * 65536 + block * 8192, 4096) for block in range(4)] for layer in range(6)]
    tok = token()
    exp = receiver.expect(tok, "dst", [r for layer in layers for r in layer], timeout_s=5)
    for i, layer in enumerate(layers):
        await sender.push(receiver.address, tok, "src", [(i * 16384, 16384)], layer)
        assert exp.done == (i == len(layers) - 1)
    await exp.wait()
    assert np.array_equal(gather_bytes(dst, [r for layer in layers for r in layer]), src[:6 * 16384])


async def test_concurrent_pushes_share_lanes(agents) -> None:
    sender, receiver, src, dst = agents
    toks = [token() for _ in range(8)]
    exps = [receiver.expect(t, "dst", [(i * 262144, 262144)], timeout_s=5) for i, t in enumerate(toks)]
    await asyncio.gather(*(sender.push(receiver.address, t, "src", [(0, 262144)], [(i * 262144, 262144)])
                           for i, t in enumerate(toks)))
    for i, exp in enumerate(exps):
        await exp.wait()
        assert np.array_equal(dst[i * 262144:(i + 1) * 262144], src[:262144])


async def test_wrong_token_rejected_and_destination_untouched(agents) -> None:
    sender, receiver, _, dst = agents
    dst[:] = 7
    exp = receiver.expect(token(), "dst", [(0, 1 << 20)], timeout_s=5)
    with pytest.raises(KVTransferError, match="token"):
        await sender.push(receiver.address, token(), "src", [(0, 1 << 20)], [(0, 1 << 20)])
    assert (dst == 7).all() and exp.bytes_received == 0 and not exp.finished
    assert receiver.stats.num_rejected >= 1 and sender.stats.num_rejected >= 1


async def test_rejected_push_of_many_pieces_ends_at_once_and_the_peer_stays_usable(agents) -> None:
    """A push of many pieces over several lanes refused by its token: it ends as a rejection (not a timeout of
    payload left in flight), writes nothing, and leaves the peer usable (UCX: the same lanes) for the next push,
    which lands whole. (Guards any protocol that sends payload before the answer, as a tried one did.)"""
    sender, receiver, src, dst = agents
    dst[:] = 5
    regions = [(i << 20, 1 << 20) for i in range(6)]  # 1 MiB pieces: the sender spreads them over lanes
    pool = getattr(sender, "_pools", {}).get(receiver.address)  # UCX: the lanes earlier tests of the module opened
    lanes = set(pool._lanes) if pool is not None else set()
    for _ in range(3):
        with pytest.raises(TransferRejected):
            await sender.push(receiver.address, token(), "src", regions, regions[::-1])
    assert (dst == 5).all()
    tok = token()
    exp = receiver.expect(tok, "dst", regions, timeout_s=5)
    await sender.push(receiver.address, tok, "src", regions, regions[::-1])
    await exp.wait()
    assert np.array_equal(gather_bytes(dst, regions[::-1]), src[:6 << 20])
    if pool is not None:
        assert lanes and lanes <= pool._lanes  # no lane was dropped by the rejections


async def test_replay_after_completion_rejected(agents) -> None:
    sender, receiver, _, dst = agents
    tok = token()
    exp = receiver.expect(tok, "dst", [(0, 4096)], timeout_s=5)
    await sender.push(receiver.address, tok, "src", [(0, 4096)], [(0, 4096)])
    await exp.wait()
    dst[:4096] = 1
    with pytest.raises(TransferRejected):
        await sender.push(receiver.address, tok, "src", [(0, 4096)], [(0, 4096)])
    assert (dst[:4096] == 1).all()


async def test_push_after_cancel_rejected_and_wait_raises(agents) -> None:
    sender, receiver, _, dst = agents
    dst[:] = 3
    tok = token()
    exp = receiver.expect(tok, "dst", [(0, 4096)], timeout_s=5)
    await receiver.cancel(tok)
    with pytest.raises(KVTransferError, match="cancelled"):
        await exp.wait()
    with pytest.raises(TransferRejected):
        await sender.push(receiver.address, tok, "src", [(0, 4096)], [(0, 4096)])
    assert (dst == 3).all()


@pytest.mark.parametrize("dst_regions", [
    [(4096, 4096)],  # entirely outside
    [(0, 8192)],  # sticks out
    [(0, 2048), (1024, 2048)],  # overlaps itself
])
async def test_region_outside_expectation_rejected(agents, dst_regions) -> None:
    sender, receiver, _, dst = agents
    dst[:] = 5
    tok = token()
    exp = receiver.expect(tok, "dst", [(0, 4096)], timeout_s=5)
    nbytes = sum(n for _, n in dst_regions)
    with pytest.raises(TransferRejected):
        await sender.push(receiver.address, tok, "src", [(0, nbytes)], dst_regions)
    assert (dst == 5).all() and not exp.finished
    await sender.push(receiver.address, tok, "src", [(0, 4096)], [(0, 4096)])  # the lane is still in sync
    await exp.wait()


async def test_duplicate_write_rejected(agents) -> None:
    sender, receiver, _, dst = agents
    tok = token()
    exp = receiver.expect(tok, "dst", [(0, 8192)], timeout_s=5)
    await sender.push(receiver.address, tok, "src", [(0, 4096)], [(0, 4096)])
    with pytest.raises(TransferRejected, match="already written"):
        await sender.push(receiver.address, tok, "src", [(0, 4096)], [(2048, 4096)])
    assert exp.bytes_received == 4096 and not exp.finished
    await receiver.cancel(tok)


async def test_timeout_when_sender_never_sends(agents) -> None:
    _, receiver, _, _ = agents
    exp = receiver.expect(token(), "dst", [(0, 4096)], timeout_s=0.3)
    with pytest.raises(KVTransferTimeout):
        await asyncio.wait_for(exp.wait(), 5)
    assert receiver.stats.num_failures >= 1


async def test_pull_exposed_regions(agents) -> None:
    sender, receiver, src, _ = agents
    local = np.zeros(1 << 20, dtype=np.uint8)
    receiver.register_buffer("local", local)
    tok = token()
    sender.expose(tok, "src", [(0, 2 << 20)], timeout_s=5)
    got = await receiver.pull(sender.address, tok, "local", [(0, 1 << 19), (1 << 19, 1 << 19)], [(1 << 20, 1 << 20)])
    assert got == 1 << 20 and np.array_equal(local, src[1 << 20:2 << 20])
    with pytest.raises(TransferRejected):
        await receiver.pull(sender.address, tok, "local", [(0, 4096)], [(2 << 20, 4096)])  # not exposed
    await sender.cancel(tok)
    with pytest.raises(TransferRejected):
        await receiver.pull(sender.address, tok, "local", [(0, 4096)], [(0, 4096)])


async def test_retired_exposure_rejects_later_pulls_and_keeps_the_lanes(agents) -> None:
    """retire (a store node's FinishRead): the reader that was served is done; a later pull under the token is
    rejected, and the connection that served it is not aborted: the next token's pull goes through."""
    sender, receiver, src, _ = agents
    local = np.zeros(1 << 20, dtype=np.uint8)
    receiver.register_buffer("retire-local", local)
    tok = token()
    sender.expose(tok, "src", [(0, 1 << 20)], timeout_s=5)
    assert await receiver.pull(sender.address, tok, "retire-local", [(0, 1 << 20)], [(0, 1 << 20)]) == 1 << 20
    sender.retire(tok)
    sender.retire(tok)  # twice, or for an unknown token: nothing happens
    sender.retire(token())
    with pytest.raises(TransferRejected):
        await receiver.pull(sender.address, tok, "retire-local", [(0, 4096)], [(0, 4096)])
    local[:] = 0
    nxt = token()
    sender.expose(nxt, "src", [(1 << 20, 1 << 20)], timeout_s=5)
    assert await receiver.pull(sender.address, nxt, "retire-local", [(0, 1 << 20)], [(1 << 20, 1 << 20)]) == 1 << 20
    assert np.array_equal(local, src[1 << 20:2 << 20])
    await sender.cancel(nxt)


async def test_torch_bfloat16_buffers(agents) -> None:
    sender, receiver, _, _ = agents
    src = torch.randn(4, 1024, dtype=torch.bfloat16)
    dst = torch.zeros(4, 1024, dtype=torch.bfloat16)
    sender.register_buffer("t_src", src)
    receiver.register_buffer("t_dst", dst)
    tok = token()
    exp = receiver.expect(tok, "t_dst", [(2048, 2048), (6144, 2048)], timeout_s=5)
    await sender.push(receiver.address, tok, "t_src", [(0, 4096)], [(2048, 2048), (6144, 2048)])
    await exp.wait()
    assert torch.equal(dst[1], src[0]) and torch.equal(dst[3], src[1]) and not dst[0].any()


async def test_caller_errors_are_invalid_request(agents) -> None:
    sender, receiver, _, _ = agents
    with pytest.raises(InvalidRequest):
        receiver.expect(token(), "dst", [(BUF_BYTES - 10, 20)], timeout_s=1)
    with pytest.raises(InvalidRequest):
        receiver.expect(b"short", "dst", [(0, 10)], timeout_s=1)
    with pytest.raises(InvalidRequest):
        await sender.push(receiver.address, token(), "src", [(0, 10)], [(0, 20)])
    with pytest.raises(InvalidRequest):
        await sender.push(receiver.address, token(), "nope", [(0, 10)], [(0, 10)])


async def test_unreachable_peer_raises_within_timeout(agents) -> None:
    sender, _, _, _ = agents
    closed = make_transport(sender.name, timeout_s=1.0)
    await closed.start()
    address = closed.address
    await closed.close()
    # The transfer's own 1 s timeout must fire; the outer 60 s bound only turns a hang into a
    # failure (asyncio.TimeoutError is neither of the expected errors), so a slow host cannot fail it.
    with pytest.raises((PeerUnavailable, KVTransferError)):
        await asyncio.wait_for(sender.push(address, token(), "src", [(0, 10)], [(0, 10)], timeout_s=1.0), 60)


async def test_stats_count_bytes(agents) -> None:
    sender, receiver, _, _ = agents
    before_sent, before_received = sender.stats.bytes_sent, receiver.stats.bytes_received
    tok = token()
    exp = receiver.expect(tok, "dst", [(0, 12345)], timeout_s=5)
    await sender.push(receiver.address, tok, "src", [(0, 12345)], [(0, 12345)])
    await exp.wait()
    assert sender.stats.bytes_sent - before_sent == 12345
    assert receiver.stats.bytes_received - before_received == 12345
    assert sender.stats.num_pushes >= 1 and sender.stats.seconds_sending > 0


async def test_push_after_expiry_rejected_and_destination_untouched(agents) -> None:
    sender, receiver, _, dst = agents
    dst[:4096] = 9
    tok = token()
    exp = receiver.expect(tok, "dst", [(0, 4096)], timeout_s=0.2)
    with pytest.raises(KVTransferTimeout):
        await asyncio.wait_for(exp.wait(), 5)
    with pytest.raises(TransferRejected):
        await sender.push(receiver.address, tok, "src", [(0, 4096)], [(0, 4096)])
    assert (dst[:4096] == 9).all()


class CudaArray:
    """Device memory as cupy or numba present it: only the CUDA array interface (never dereferenced here)."""

    __cuda_array_interface__ = {"shape": (4096,), "typestr": "|u1", "data": (0x7F00_0000_0000, False), "version": 3,
                                "strides": None}


async def test_device_memory_it_cannot_move_is_refused_naming_device_and_backend(agents) -> None:
    sender, _, _, _ = agents
    if sender.name == "ucx":
        from pdserve.transfer.ucx_env import available_transports

        if any(t.startswith("cuda") for t in available_transports()):
            pytest.skip("this UCX has CUDA transports: it accepts device memory")
    with pytest.raises(InvalidRequest, match=rf"(?s){sender.name}.*cuda:0"):
        sender.register_buffer("device", CudaArray())
    with pytest.raises(InvalidRequest, match="no registered buffer"):
        await sender.push(sender.address, token(), "device", [(0, 10)], [(0, 10)])
