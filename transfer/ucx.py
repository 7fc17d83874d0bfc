"""The UCX backend of `KVTransport` (base.py): moves KV bytes between registered buffers of two processes over
ucxx; never chooses blocks.

    transport = UCXTransport(host="127.0.0.1", port=0, *, num_lanes=4, timeout_s=30.0,
                             max_piece_bytes=16 << 20, lane_min_bytes=16 << 20, network_lane_min_bytes=2 << 20,
                             shared_memory="auto", rma_reads=False, cma_reads=True, stream_pushes=True)
    await transport.start(); transport.address -> "host:port"; await transport.close()
    transport.register_buffer(name, numpy_array_or_torch_tensor_or_cuda_array); transport.unregister_buffer(name)
    # receiver of a push (e.g. decode worker): one-time token from the reservation
    exp = transport.expect(token, buffer, [(byte_offset, nbytes), ...], timeout_s) -> Expectation
    await exp.wait()  # all regions landed; KVTransferTimeout / KVTransferError otherwise
    await transport.cancel(token)  # drops an expectation or exposure; later data with the token is rejected
    # sender (e.g. prefill worker); several pushes per token allowed (one per layer), no overlaps
    nbytes = await transport.push(peer, token, src_buffer, src_regions, dst_regions, timeout_s=None)
    # reads (KV store): the owner exposes regions, the reader pulls them into its own buffer
    transport.expose(token, buffer, regions, timeout_s) -> Exposure
    nbytes = await transport.pull(peer, token, dst_buffer, dst_regions, src_regions, timeout_s=None)
    transport.stats -> TransferStats (a copy)

Protocol, per lane (a ucxx endpoint pair; a push spreads over up to `num_lanes` lanes):
 1. connect: HELLO carries host identity and UCX worker address both ways; when the peers share memory
    (host.py: same kernel, network and pid namespace, or --transfer-shared-memory on) each side also opens a
    shared-memory data endpoint (sysv + CMA zero-copy) to the other.
 2. push: OPEN{token, all dst regions, this lane's pieces} -> the receiver checks the token (known,
    live) and that every region lies in the expectation and was not claimed before, BEFORE posting a
    receive; it replies REJECT{reason} (nothing written) or READY{push_id, random payload tag base}.
 3. other lanes: DATA{push_id, pieces} -> READY/REJECT likewise; then the payload pieces, tagged
    base|index, straight from/into the registered memory; the receiver answers DONE{nbytes} or FAILED.
 3a. same-host reads (cma_reads=True, opt-in: --transfer-direct-paths; host memory on both ends, peers sharing memory): HELLO also
    carries the sender's pid and a probe (an address and the bytes there), which the receiver reads by CMA to prove
    it may; then a push is one OPEN_CMA{token, dst regions, dst pieces, the sender's source addresses} on one lane:
    the receiver checks the token and regions exactly as for OPEN, copies the pieces out of the sender's memory with
    process_vm_readv itself (cma.py; a sender that died makes the syscall fail, not the reader) and answers DONE,
    or REJECT before reading anything, or UNSUPPORTED (its buffer is device memory: the sender pushes tagged).
 3a'. the OPEN_CMA request and its reply go over a Unix socket between the two processes (cma_channel.py, its name
    in HELLO_REPLY) rather than a UCX lane: one event-loop wake-up per message instead of ucxx's three.
 3a''. other hosts (stream_pushes=True, opt-in: --transfer-direct-paths; host memory, no shared memory with the peer, no RDMA here): pushes up
    to stream_max_bytes (8 MiB) as OPEN_STREAM{token, dst regions, pieces} and the pieces' bytes right behind it on a
    plain TCP connection (tcp_stream.py, port in HELLO_REPLY); larger ones over UCX's lanes; the receiver checks the
    token and regions before it reads the payload off the socket into its buffer (a refused payload is read into scratch
    and dropped) and answers DONE / REJECT / UNSUPPORTED / FAILED: one round trip, one kernel copy per side.
 3b. reads (opt-in, rma_reads=True; where UCX reads in the kernel or hardware: shared memory/CMA, RDMA, CUDA): the push
    is one OPEN_READ{token, dst regions, the sender's packed rkey and buffer address, pieces} on one lane; the
    receiver checks the token and regions exactly as for OPEN, then posts one UCX RMA GET per piece from the
    sender's registered memory straight into its buffer, all at once on a worker thread (ucx_native.py), waits for
    them and answers DONE (or REJECT before reading anything). Two control messages per push, whatever the number
    of regions: fragmentation costs a GET each (a few us), not a rendezvous message (about 50-100 us). The sender's
    rkey grants reads of its registered buffer only; writes into a buffer are always made by its owner.
 4. pull: PULL{token, src pieces} -> READY or REJECT, then the owner sends the pieces with the
    puller's tag base. Control messages are tagged with seq*8+slot on their own endpoint.
 5. every wait has a deadline; any failure after READY aborts the lane (cancelling its posted receives)
    and fails the expectation; expiry or cancel aborts the lanes still writing into it.

Device memory (CUDA torch tensors, cupy arrays) is handed to ucxx through the CUDA array interface, so UCX picks
cuda_copy / cuda_ipc / RDMA itself; registering it fails at once when this process's UCX has no CUDA transport.

ucxx keeps one UCX context and worker per process in a module global (unavoidable); UCX reads its
settings from the environment when that context is created: see `ucx_env.py` for our defaults. The
context's notifier thread completes futures on the event loop running when the first transport starts, so
all transports of a process must run on that one loop (tests use a session-scoped loop). The listener
accepts on all interfaces (ucxx cannot bind one); `host` is the address peers are told.
Errors: TransferRejected (a KVTransferError: refused before any byte moved), KVTransferTimeout,
KVTransferError (connection lost, peer failed mid-way), PeerUnavailable (cannot connect),
InvalidRequest (the caller's own regions, buffer names or token are wrong).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from pdserve.errors import InvalidRequest, KVTransferError, PeerUnavailable

from .base import TransferRejected, TransferStats
from .buffers import TransportCore
from .cma import Cma
from .cma_channel import Channel
from .tcp_stream import StreamPool
from .host import host_identity, shares_memory_with
from .memory import Memory, memory_of
from .regions import Piece, Region, check_regions, pair_regions, split_among_lanes, total_bytes
from .tokens import Expectation, Exposure
from .ucx_env import available_transports, import_ucxx
from .ucx_lane import Lane, LanePool, bounded, gather_or_fail
from .ucx_native import CANCEL_WAIT_S, Mapped, TagBatch, Ucp
from .ucx_server import TransferServer
from .wire import (CAP_CMA_READ, CAP_CMA_SOURCE, CAP_RMA_READ, CAP_STREAM, MAX_PIECES_PER_OP, BodyReader, BodyWriter, Kind, Slot,
                   new_payload_tag_base)

logger = logging.getLogger(__name__)


class UCXTransport(TransportCore):
    """One per process: a ucxx listener plus a pool of outgoing lanes (endpoints) per peer."""

    name = "ucx"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, num_lanes: int = 4, timeout_s: float = 30.0,
                 max_piece_bytes: int = 16 << 20, lane_min_bytes: int = 16 << 20, network_lane_min_bytes: int = 2 << 20,
                 shared_memory: str = "auto", rma_reads: bool = False, native_batches: bool = True,
                 cma_reads: bool = False, stream_pushes: bool = False, stream_max_bytes: int = 8 << 20) -> None:
        if min(num_lanes, timeout_s, max_piece_bytes, lane_min_bytes, network_lane_min_bytes) <= 0:
            raise ValueError("num_lanes, timeout_s, max_piece_bytes and the lane_min_bytes must be positive")
        self.host = host
        self.port = port
        self.num_lanes = num_lanes
        self.timeout_s = timeout_s
        self.max_piece_bytes = max_piece_bytes  # large regions are cut into pieces of at most this
        # A push uses one more lane per this many bytes: over shared memory lanes share one copying progress thread,
        # so only large pushes split; over TCP parallel connections pay already at a few MiB (docs/transfer_bandwidth.md).
        self.lane_min_bytes = lane_min_bytes
        self.network_lane_min_bytes = network_lane_min_bytes
        shares_memory_with(shared_memory, "", "")  # checks the setting
        self.shared_memory = shared_memory  # auto | on | off (host.py)
        # rma_reads: pushes move as one batch of RMA reads by the receiver (ucx_native.py) when both ends offer it, else as
        # tagged sends. Off by default: over shared memory UCX reads by CMA on an endpoint without error handling, and a
        # sender killed mid-read aborts the reading process (measured); see docs/kv_fragmentation.md.
        self.rma_reads = rma_reads
        # native_batches: the pieces of an operation are posted straight into libucp and waited for together
        # (ucx_native.TagBatch); False: one ucxx request and future per piece (as before; kept for the benchmark).
        self.native_batches = native_batches
        # cma_reads: pushes of host memory to a peer that shares memory move as OPEN_CMA (the receiver copies them out of
        # our memory with process_vm_readv: two control messages, no READY round trip); False: tagged sends over UCX.
        self.cma_reads = cma_reads
        # stream_pushes: pushes of host memory to a peer without shared memory (another host), where this process has
        # no RDMA, go over plain TCP (tcp_stream.py: OPEN_STREAM + payload -> DONE); False: tagged sends over UCX TCP.
        self.stream_pushes = stream_pushes
        # Up to this many bytes per push: one TCP stream beats UCX at 4 MiB but lost to UCX's parallel lanes from 64 MiB
        # (two netns hosts, 2026-12-02 16:17 UTC: 0.83 vs 1.07 GB/s at 64 MiB, 0.73 vs 1.18 at 256 MiB).
        self.stream_max_bytes = stream_max_bytes
        super().__init__()
        self.host_id = host_identity()
        self._pools: dict[str, LanePool] = {}  # peer "host:port" -> its lanes
        self._server: TransferServer | None = None
        self._ucxx = import_ucxx()
        self._hello_body = b""  # set in start(): asking for the worker address creates the UCX context
        self._caps = 0  # our HELLO flags (set in start())
        self._cma: Cma | None = None  # set in start() when cma_reads and the syscall exists
        self._cma_probe = np.frombuffer(secrets.token_bytes(16), dtype=np.uint8).copy()  # peers read it at HELLO
        self._channels: dict[str, Channel] = {}  # peer -> its CMA channel (cma_channel.py), opened on first use
        self._streams: dict[str, StreamPool] = {}  # peer -> its TCP stream connections (tcp_stream.py)
        self._ucp: Ucp | None = None  # set in start() when native_batches and libucp can be called
        self._rma: Ucp | None = None  # set in start() when rma_reads and libucp offers RMA
        self._mapped: dict[str, Mapped] = {}  # buffer name -> its UCX memory handle and packed rkey (lazily)
        self._rdma = False  # whether this process's UCX has an RDMA transport (set in start())

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Starts the listener. The first agent of a process creates ucxx's context, whose notifier thread is tied to
        the running event loop: every agent of a process must run on that one loop."""
        worker_address = bytes(self._ucxx.get_worker_address())
        ucp = Ucp.get(self._ucxx) if self.native_batches or self.rma_reads else None
        self._ucp = ucp if self.native_batches else None
        self._rma = ucp if self.rma_reads and ucp is not None and ucp.rma else None
        self._rdma = any(t.startswith(("rc", "dc")) for t in available_transports())
        self._caps = CAP_RMA_READ if self._rma is not None else 0
        self._cma = Cma.get() if self.cma_reads and self.shared_memory != "off" else None
        self._hello_body = BodyWriter().blob(self.host_id.encode()).blob(worker_address).build()
        self._server = TransferServer(self._ucxx, self._registry, self._stats, hello_body=self._hello_body,
                                      caps=self._caps, attach_data_endpoint=self.attach_data_endpoint,
                                      timeout_s=self.timeout_s, ucp=self._ucp, rma=self._rma,
                                      local_memh=self._local_memh, cma=self._cma, cma_peer=self._shares_memory,
                                      streams=self.stream_pushes)
        self.port = await self._server.start(self.port)
        logger.info("transfer agent listening on %s (%d lanes per peer)", self.address, self.num_lanes)

    async def close(self) -> None:
        self._registry.close("transfer agent closed")
        if self._server is not None:
            await self._server.drain()  # read batches stop before any endpoint goes
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        for streams in self._streams.values():
            streams.close()
        self._streams.clear()
        if self._server is not None:
            await self._server.close()
            self._server = None
        for name in list(self._mapped):
            self._unmap(name)

    @property
    def address(self) -> str:
        if self._server is None:
            raise RuntimeError("UCXTransport.start() was not called")
        return f"{self.host}:{self.port}"

    # ---- buffers and tokens ----------------------------------------------------------------------
    def register_buffer(self, name: str, buf: object) -> None:
        """Makes a contiguous numpy array, torch tensor (CPU or CUDA) or CUDA array addressable by name (no copy)."""
        memory = memory_of(buf)
        if memory.is_device:
            transports = available_transports()
            if not any(t.startswith(("cuda", "gdr", "rc", "dc")) for t in transports):
                raise InvalidRequest(f"the ucx transport cannot move {memory.device} memory: this process's UCX "
                                     f"offers only {', '.join(transports)} (no cuda_copy/cuda_ipc)")
        self._unmap(name)
        self._buffers[name] = memory

    def unregister_buffer(self, name: str) -> None:
        self._unmap(name)
        super().unregister_buffer(name)

    def _mapping(self, name: str) -> Mapped | None:
        """The buffer's UCX memory handle and packed rkey, mapped on first use; None without RMA or if UCX refuses."""
        if self._rma is None:
            return None
        mapped = self._mapped.get(name)
        memory = self._buffers.get(name)
        if mapped is None and memory is not None:
            try:
                mapped = self._mapped[name] = self._rma.map(memory)
            except KVTransferError as exc:
                logger.warning("buffer %r moves by tagged sends: %s", name, exc)
        return mapped

    def _local_memh(self, memory: Memory) -> int | None:
        for name, registered in self._buffers.items():
            if registered is memory:
                mapped = self._mapping(name)
                return mapped.memh if mapped is not None else None
        return None

    def _unmap(self, name: str) -> None:
        mapped = self._mapped.pop(name, None)
        if mapped is not None and self._rma is not None:
            self._rma.unmap(mapped)

    async def cancel(self, token: bytes) -> None:
        """Drops the expectation or exposure of `token`; data in flight under it is cut off (its lanes are aborted,
        which cancels the receives posted into the buffer; a batch of reads stops posting and is waited for), later
        requests rejected."""
        self._registry.cancel(token)
        if self._server is not None:
            await self._server.drain([token])

    def retire(self, token: bytes) -> None:
        self._registry.retire(token)

    # ---- sender side -----------------------------------------------------------------------------
    def _pool(self, peer: str) -> LanePool:
        pool = self._pools.get(peer)
        if pool is None:
            pool = self._pools[peer] = LanePool(peer, lambda deadline: self._connect(peer, deadline), self.num_lanes)
        return pool

    async def _connect(self, peer: str, deadline: float) -> Lane:
        host, _, port = peer.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidRequest(f"peer address must be host:port, got {peer!r}")
        remaining = max(0.001, deadline - asyncio.get_running_loop().time())
        try:
            ep = await bounded(self._ucxx.create_endpoint(host, int(port), connect_timeout=remaining), deadline,
                               f"connect to {peer}")
        except KVTransferError as exc:
            raise PeerUnavailable(str(exc)) from exc
        lane = Lane(ep, peer, self.timeout_s)
        hello = BodyWriter()
        if self._cma is not None:  # the listener may read our memory by CMA: our pid and a probe to check it can
            hello.u64(self._caps | CAP_CMA_SOURCE).u64(os.getpid()).u64(int(self._cma_probe.ctypes.data))
            hello.blob(self._cma_probe.tobytes())
        else:
            hello.u64(self._caps)
        try:
            await lane.send_message(0, Slot.REQUEST_HEADER, Kind.HELLO, self._hello_body + hello.build(), deadline)
            kind, reply = await lane.recv_message(0, Slot.REPLY_HEADER, deadline)
            if kind != Kind.HELLO_REPLY:
                raise KVTransferError(f"{peer} answered HELLO with {kind.name}")
            reader = BodyReader(reply)
            peer_host_id, peer_worker_address = reader.blob().decode(), reader.blob()
            lane.peer_caps = reader.u64() if reader.remaining() else 0
            if lane.peer_caps & CAP_CMA_READ and reader.remaining():
                lane.cma_channel = reader.blob().decode()
            if lane.peer_caps & CAP_STREAM and reader.remaining():
                lane.stream_port = reader.u64()
            if self._cma is None or not self._shares_memory(peer_host_id):
                lane.peer_caps &= ~CAP_CMA_READ
            await self.attach_data_endpoint(lane, peer_host_id, peer_worker_address)
        except BaseException:
            lane.abort()
            raise
        logger.debug("opened %r", lane)
        return lane

    def _shares_memory(self, peer_host_id: str) -> bool:
        return shares_memory_with(self.shared_memory, self.host_id, peer_host_id)

    async def attach_data_endpoint(self, lane: Lane, peer_host_id: str, peer_worker_address: bytes) -> None:
        """When the peers share memory, a worker-address endpoint without UCX error handling: the only kind UCX runs
        over shm/CMA."""
        if not shares_memory_with(self.shared_memory, self.host_id, peer_host_id):
            return
        address = self._ucxx.get_ucx_address_from_buffer(peer_worker_address)
        lane.data_out = await self._ucxx.create_endpoint_from_worker_address(address, endpoint_error_handling=False)

    async def push(self, peer: str, token: bytes, src_buffer: str, src_regions: Sequence[Region],
                   dst_regions: Sequence[Region], *, timeout_s: float | None = None) -> int:
        """Writes src regions of a local buffer into the peer's dst regions under `token`; returns bytes sent.

        Raises KVTransferError if the peer rejects it (nothing written), KVTransferTimeout past timeout_s,
        PeerUnavailable if no lane can be opened.
        """
        started = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + (self.timeout_s if timeout_s is None else timeout_s)
        view = self._view(src_buffer)
        src = check_regions(src_regions, view.nbytes, "push src")
        dst = check_regions(dst_regions, 1 << 62, "push dst")
        pieces = pair_regions(src, dst, self.max_piece_bytes)
        nbytes = total_bytes(src)
        pool = self._pool(peer)
        mapped = self._mapping(src_buffer)
        cma = self._cma is not None and not view.is_device
        stream = self.stream_pushes and not view.is_device and not self._rdma and nbytes <= self.stream_max_bytes
        if (mapped is not None or cma or stream) and pool.peer_caps is None:
            await self._release(pool, await self._acquire(pool, 1, deadline), True)  # learn what the peer offers
        caps = pool.peer_caps or 0
        # one direct path at most (each returns False when the peer answers UNSUPPORTED: then lanes, tagged)
        direct = None
        if mapped is not None and caps & CAP_RMA_READ and self._reads_pay(pool, mapped):
            direct = self._push_read(pool, token, mapped, dst, pieces, deadline)
        elif cma and caps & CAP_CMA_READ:
            direct = self._push_cma(pool, token, view, dst, pieces, deadline)
        elif stream and caps & CAP_STREAM and pool.shares_memory is False and pool.stream_port:
            direct = self._push_stream(pool, token, view, dst, pieces, deadline)
        if direct is not None:
            try:
                moved = await direct
            except BaseException as exc:
                self._count_error(exc)
                self._stats.seconds_sending += time.perf_counter() - started
                raise
            if moved:
                self._stats.seconds_sending += time.perf_counter() - started
                self._stats.bytes_sent += nbytes
                self._stats.num_pushes += 1
                return nbytes
        lanes = await self._acquire(pool, self._num_lanes(pool, nbytes), deadline)
        groups = split_among_lanes(pieces, len(lanes))
        clean = False  # lanes stay usable only after success or a rejected OPEN (nothing else was sent)
        try:
            if any(len(group) > MAX_PIECES_PER_OP for group in groups):
                clean = True
                raise InvalidRequest(f"too many pieces ({len(pieces)}) in one push")
            first = lanes[0]
            open_body = BodyWriter().blob(token).regions(dst).regions([(p.dst_offset, p.nbytes) for p in groups[0]])
            seq = first.next_seq()
            try:
                push_id, tag_base = await self._request_ready(first, seq, Kind.OPEN, open_body.build(), deadline)
            except TransferRejected:
                clean = True
                raise
            ops = [self._send_pieces(first, seq, tag_base, view, groups[0], deadline)]
            ops += [self._push_data(lane, push_id, view, group, deadline) for lane, group in zip(lanes[1:], groups[1:])]
            await gather_or_fail(ops, deadline, f"push to {peer}")
            clean = True
        except BaseException as exc:
            self._count_error(exc)
            raise
        finally:
            self._stats.seconds_sending += time.perf_counter() - started
            await self._release(pool, lanes, clean)
        self._stats.bytes_sent += nbytes
        self._stats.num_pushes += 1
        return nbytes

    async def _push_read(self, pool: LanePool, token: bytes, mapped: Mapped, dst: list[Region], pieces: list[Piece],
                         deadline: float) -> bool:
        """OPEN_READ{token, dst regions, our rkey, pieces} on one lane: the receiver checks the token, reads every
        piece from our registered memory in one batch and answers DONE (True; REJECT before reading anything
        raises)."""
        lanes = await self._acquire(pool, 1, deadline)
        lane = lanes[0]
        clean = False
        try:
            body = (BodyWriter().blob(token).regions(dst).blob(mapped.rkey).u64(mapped.memory.ptr)
                    .regions([(p.dst_offset, p.nbytes) for p in pieces])
                    .regions([(p.src_offset, p.nbytes) for p in pieces]).build())
            seq = lane.next_seq()
            await lane.send_message(seq, Slot.REQUEST_HEADER, Kind.OPEN_READ, body, deadline)
            kind, reply = await lane.recv_message(seq, Slot.REPLY_HEADER, deadline)
            if kind == Kind.REJECT:
                clean = True
                raise TransferRejected(f"{lane.peer} rejected OPEN_READ: {bytes(reply).decode(errors='replace')}")
            if kind != Kind.DONE:
                raise KVTransferError(f"{lane.peer} answered OPEN_READ with {kind.name}")
            clean = True
        finally:
            await self._release(pool, lanes, clean)
        return True

    async def _push_cma(self, pool: LanePool, token: bytes, view: Memory, dst: list[Region], pieces: list[Piece],
                        deadline: float) -> bool:
        """OPEN_CMA{token, dst regions, dst pieces, our source addresses} on one lane: the receiver checks the token,
        copies the pieces out of our memory and answers DONE (True), REJECT (raised), or UNSUPPORTED (False: nothing
        was checked or written; the caller pushes tagged)."""
        body = (BodyWriter().blob(token).regions(dst).regions([(p.dst_offset, p.nbytes) for p in pieces])
                .regions([(view.ptr + p.src_offset, p.nbytes) for p in pieces]).build())
        channel = await self._channel(pool, deadline)
        if channel is not None:
            kind, reply = await channel.request(Kind.OPEN_CMA, body, deadline)
            return self._read_reply(pool.peer, kind, reply)
        lanes = await self._acquire(pool, 1, deadline)  # no channel: the request goes over a lane
        lane = lanes[0]
        clean = False
        try:
            if not lane.peer_caps & CAP_CMA_READ:
                clean = True
                return False
            seq = lane.next_seq()
            await lane.send_message(seq, Slot.REQUEST_HEADER, Kind.OPEN_CMA, body, deadline)
            kind, reply = await lane.recv_message(seq, Slot.REPLY_HEADER, deadline)
            clean = kind in (Kind.REJECT, Kind.UNSUPPORTED, Kind.DONE)
            return self._read_reply(lane.peer, kind, reply)
        finally:
            await self._release(pool, lanes, clean)

    async def _push_stream(self, pool: LanePool, token: bytes, view: Memory, dst: list[Region], pieces: list[Piece],
                           deadline: float) -> bool:
        """OPEN_STREAM{token, dst regions, dst pieces} and the pieces' bytes over a TCP stream to the peer: True once
        it answered DONE, False for UNSUPPORTED (push tagged); REJECT raises TransferRejected."""
        streams = self._streams.get(pool.peer)
        if streams is None:
            host = pool.peer.rpartition(":")[0]
            streams = self._streams[pool.peer] = StreamPool(host, pool.stream_port, self.num_lanes)
        body = BodyWriter().blob(token).regions(dst).regions([(p.dst_offset, p.nbytes) for p in pieces]).build()
        host_view = view.host_view
        assert host_view is not None
        payload = [memoryview(host_view[p.src_offset:p.src_offset + p.nbytes]) for p in pieces]
        kind, reply = await streams.request(Kind.OPEN_STREAM, body, payload, deadline)
        return self._read_reply(pool.peer, kind, reply)

    @staticmethod
    def _read_reply(peer: str, kind: Kind, reply: bytes | bytearray) -> bool:
        """True for DONE, False for UNSUPPORTED (push tagged); raises for REJECT (TransferRejected) and the rest."""
        reason = bytes(reply).decode(errors="replace")
        if kind == Kind.DONE:
            return True
        if kind == Kind.UNSUPPORTED:
            return False
        if kind == Kind.REJECT:
            raise TransferRejected(f"{peer} rejected the push: {reason}")
        raise KVTransferError(f"{peer} answered {kind.name}: {reason}")

    async def _channel(self, pool: LanePool, deadline: float) -> Channel | None:
        """The peer's CMA channel, connected on first use; None when it offers none or it cannot be reached."""
        channel = self._channels.get(pool.peer)
        if channel is not None and not channel.closed:
            return channel
        name = pool.cma_channel
        if not name:
            return None
        try:
            channel = self._channels[pool.peer] = await Channel.connect(name, deadline)
        except (OSError, KVTransferError) as exc:
            logger.warning("cannot open the CMA channel to %s (%s): OPEN_CMA goes over UCX", pool.peer, exc)
            pool.cma_channel_failed = True
            return None
        return channel

    def _reads_pay(self, pool: LanePool, mapped: Mapped) -> bool:
        """Reads where UCX does them in hardware or the kernel: shared memory (CMA), RDMA, CUDA (cuda_ipc, GPUDirect).
        Over plain TCP UCX emulates a GET with active messages on one lane, where tagged sends spread over lanes do
        at least as well (docs/kv_fragmentation.md), so pushes there stay tagged."""
        return bool(pool.shares_memory) or self._rdma or mapped.memory.is_device

    def _num_lanes(self, pool: LanePool, nbytes: int) -> int:
        min_bytes = self.network_lane_min_bytes if pool.shares_memory is False else self.lane_min_bytes
        return min(self.num_lanes, max(1, nbytes // min_bytes))

    async def _acquire(self, pool: LanePool, num_lanes: int, deadline: float) -> list[Lane]:
        try:
            return await pool.acquire(num_lanes, deadline)
        except BaseException as exc:
            self._count_error(exc)
            raise

    async def _release(self, pool: LanePool, lanes: list[Lane], clean: bool) -> None:
        if not clean:
            for lane in lanes:
                lane.abort()  # cancels whatever is still posted through it
        await pool.release(lanes)

    async def _push_data(self, lane: Lane, push_id: int, view: Memory, pieces: list[Piece],
                         deadline: float) -> None:
        body = BodyWriter().u64(push_id).regions([(p.dst_offset, p.nbytes) for p in pieces]).build()
        seq = lane.next_seq()
        _, tag_base = await self._request_ready(lane, seq, Kind.DATA, body, deadline)
        await self._send_pieces(lane, seq, tag_base, view, pieces, deadline)

    async def _request_ready(self, lane: Lane, seq: int, kind: Kind, body: bytes, deadline: float) -> tuple[int, int]:
        """Sends a request, waits for READY -> (push_id, tag_base); REJECT raises TransferRejected (lane stays usable)."""
        await lane.send_message(seq, Slot.REQUEST_HEADER, kind, body, deadline)
        reply_kind, reply = await lane.recv_message(seq, Slot.REPLY_HEADER, deadline)
        if reply_kind == Kind.REJECT:
            raise TransferRejected(f"{lane.peer} rejected {kind.name}: {bytes(reply).decode(errors='replace')}")
        if reply_kind != Kind.READY:
            lane.broken = True
            raise KVTransferError(f"{lane.peer} answered {kind.name} with {reply_kind.name}")
        reader = BodyReader(reply)
        push_id, tag_base = reader.u64(), reader.u64()
        reader.finish()
        return push_id, tag_base

    async def _send_pieces(self, lane: Lane, seq: int, tag_base: int, view: Memory, pieces: list[Piece],
                           deadline: float) -> None:
        if self._ucp is not None and len(pieces) > 1:  # all but the last piece posted into libucp now
            batch = TagBatch(self._ucp)
            ep = lane.data_out.ucp_endpoint
            for i, p in enumerate(pieces[:-1]):
                batch.send(ep, view.ptr + p.src_offset, p.nbytes, tag_base | i)
            last = pieces[-1]
            sends = [batch.finish(lane.send_payload(view.slice(last.src_offset, last.nbytes),
                                                    tag_base | (len(pieces) - 1)), deadline)]
        else:
            sends = [lane.send_payload(view.slice(p.src_offset, p.nbytes), tag_base | i)
                     for i, p in enumerate(pieces)]

        async def final_reply() -> None:
            kind, body = await lane.recv_message(seq, Slot.FINAL_HEADER, deadline)
            if kind != Kind.DONE:
                raise KVTransferError(f"{lane.peer}: {kind.name}: {bytes(body).decode(errors='replace')}")

        await gather_or_fail([*sends, final_reply()], deadline, f"{lane!r} payload")

    # ---- reader side -----------------------------------------------------------------------------
    async def pull(self, peer: str, token: bytes, dst_buffer: str, dst_regions: Sequence[Region],
                   src_regions: Sequence[Region], *, timeout_s: float | None = None) -> int:
        """Reads the peer's exposed src regions (authorised by `token`) into local dst regions; returns bytes read."""
        started = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + (self.timeout_s if timeout_s is None else timeout_s)
        view = self._view(dst_buffer)
        dst = check_regions(dst_regions, view.nbytes, "pull dst")
        src = check_regions(src_regions, 1 << 62, "pull src")
        pieces = pair_regions(src, dst, self.max_piece_bytes)
        nbytes = total_bytes(dst)
        pool = self._pool(peer)
        lanes = await self._acquire(pool, self._num_lanes(pool, nbytes), deadline)
        clean = False  # a rejection leaves the lane usable only if it was the only one
        try:
            groups = split_among_lanes(pieces, len(lanes))
            if any(len(group) > MAX_PIECES_PER_OP for group in groups):
                clean = True
                raise InvalidRequest(f"too many pieces ({len(pieces)}) in one pull")
            await gather_or_fail([self._pull_on_lane(lane, token, view, group, deadline)
                                  for lane, group in zip(lanes, groups)], deadline, f"pull from {peer}")
            clean = True
        except BaseException as exc:
            clean = clean or (isinstance(exc, TransferRejected) and len(lanes) == 1)
            self._count_error(exc)
            raise
        finally:
            self._stats.seconds_receiving += time.perf_counter() - started
            await self._release(pool, lanes, clean)
        self._stats.bytes_received += nbytes
        self._stats.num_pulls += 1
        return nbytes

    async def _pull_on_lane(self, lane: Lane, token: bytes, view: Memory, pieces: list[Piece],
                            deadline: float) -> None:
        tag_base = new_payload_tag_base()
        body = BodyWriter().blob(token).u64(tag_base).regions([(p.src_offset, p.nbytes) for p in pieces]).build()
        seq = lane.next_seq()
        await self._request_ready(lane, seq, Kind.PULL, body, deadline)
        batch = None
        if self._ucp is not None and len(pieces) > 1:
            batch = TagBatch(self._ucp)
            for i, p in enumerate(pieces[:-1]):
                batch.recv(view.ptr + p.dst_offset, p.nbytes, tag_base | i)
            last = pieces[-1]
            waiter = asyncio.ensure_future(batch.finish(
                lane.recv_payload(view.slice(last.dst_offset, last.nbytes), tag_base | (len(pieces) - 1)), deadline))
            recvs: list[Any] = [asyncio.shield(waiter)]
        else:
            recvs = [lane.recv_payload(view.slice(p.dst_offset, p.nbytes), tag_base | i)
                     for i, p in enumerate(pieces)]
        try:
            await gather_or_fail(recvs, deadline, f"{lane!r} pull payload")
        except BaseException:
            lane.abort()  # cancels receives still posted into our buffer
            if batch is not None:
                batch.abort()  # our own receives: cancelled here, waited for below
                await asyncio.wait([waiter], timeout=CANCEL_WAIT_S + 1.0)
            raise



__all__ = ["Expectation", "Exposure", "TransferRejected", "TransferStats", "UCXTransport"]
