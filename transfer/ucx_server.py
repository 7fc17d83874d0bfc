"""Listener side of the UCX backend: accepts lanes and serves OPEN/DATA (writes into expectations), OPEN_CMA and
OPEN_READ (reads the sender's memory into expectations) and PULL (reads from exposures), one request at a time per
lane, asking the TokenRegistry before any receive, read or send.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pdserve.errors import KVTransferError, KVTransferTimeout

from .base import TransferRejected, TransferStats
from .cma import Cma, CmaBatch
from .cma_channel import ChannelServer
from .tcp_stream import StreamServer, drain, recv_into_all
from .memory import Memory
from .tokens import Expectation, Push, TokenRegistry
from .ucx_lane import Lane, bounded, gather_or_fail
from .ucx_native import CANCEL_WAIT_S, ReadBatch, TagBatch, Ucp
from .wire import CAP_CMA_READ, CAP_CMA_SOURCE, CAP_STREAM, BodyReader, BodyWriter, Kind, Slot, new_payload_tag_base

logger = logging.getLogger(__name__)

AttachDataEndpoint = Callable[[Lane, str, bytes], Awaitable[None]]  # (lane, peer host id, peer worker address)
LocalMemh = Callable[[Memory], "int | None"]  # our UCX memory handle of a registered buffer (None: unmapped)
CMA_INLINE_BYTES = 8 << 20  # a CMA read up to this size runs on the event loop (about 1 ms here); larger on threads


class TransferServer:
    """A ucxx listener and the lanes peers opened to it."""

    def __init__(self, ucxx: Any, registry: TokenRegistry, stats: TransferStats, *, hello_body: bytes, caps: int,
                 attach_data_endpoint: AttachDataEndpoint, timeout_s: float, ucp: Ucp | None = None,
                 rma: Ucp | None = None, local_memh: LocalMemh | None = None, cma: Cma | None = None,
                 cma_peer: Callable[[str], bool] | None = None, cma_threads: int = 2, streams: bool = False) -> None:
        self._ucxx = ucxx
        self._ucp = ucp  # posts an operation's pieces straight into libucp when set
        self._rma = rma  # serves OPEN_READ when set (our HELLO says so)
        self._local_memh = local_memh or (lambda memory: None)
        self._reads: dict[bytes, set[asyncio.Future[None]]] = {}  # token -> batches still landing bytes
        self._registry = registry
        self._stats = stats
        self._hello_body = hello_body  # our host identity and worker address
        self._caps = caps  # our HELLO_REPLY flags; CAP_CMA_READ is added per lane
        self._cma = cma  # serves OPEN_CMA from peers whose memory we may read (set: same-host reads are on)
        self._cma_peer = cma_peer or (lambda peer_host_id: False)  # whether a peer shares our memory (host.py)
        self._cma_threads = max(1, cma_threads)
        self._cma_pids: set[int] = set()  # clients whose memory a probe showed we may read
        self._channel = ChannelServer(self.serve_cma, self._cma_pids.__contains__) if cma is not None else None
        self._streams = StreamServer(self.serve_stream) if streams else None  # OPEN_STREAM over TCP (tcp_stream.py)
        self._attach_data_endpoint = attach_data_endpoint
        self._timeout_s = timeout_s
        self._listener: Any = None
        self._lanes: set[Lane] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, port: int) -> int:
        """Starts listening (port 0: any free port), and the CMA channel's listener; returns the port."""
        if self._channel is not None:
            try:
                await self._channel.start()
            except OSError as exc:  # OPEN_CMA then goes over the lanes
                logger.warning("no CMA channel (%s): same-host pushes ask over UCX", exc)
                self._channel = None
        if self._streams is not None:
            try:
                await self._streams.start()
            except OSError as exc:
                logger.warning("no TCP stream listener (%s): pushes from other hosts go through UCX", exc)
                self._streams = None
        self._listener = self._ucxx.create_listener(self._serve, port=port)
        return int(self._listener.port)

    def _track(self, token: bytes, aw: Awaitable[None]) -> asyncio.Future[None]:
        """A future for `aw` (a batch landing bytes under `token`), which drain() waits for until it returns."""
        future = asyncio.ensure_future(aw)
        running = self._reads.setdefault(token, set())
        running.add(future)

        def forget(_: object) -> None:
            running.discard(future)
            if not running and self._reads.get(token) is running:
                del self._reads[token]
            if not future.cancelled():
                future.exception()  # retrieved: a failure is reported through the expectation

        future.add_done_callback(forget)
        return future

    async def drain(self, tokens: list[bytes] | None = None) -> None:
        """Waits for the batches landing bytes under `tokens` (None: all) to return; their expectations were failed
        first, so they stop posting and what they posted is cancelled. After this no byte lands under those tokens."""
        futures = [f for token in (list(self._reads) if tokens is None else tokens) for f in self._reads.get(token, ())]
        if futures:
            _, pending = await asyncio.wait(futures, timeout=self._timeout_s)
            if pending:
                logger.error("%d UCX read batch(es) still running after %.0f s", len(pending), self._timeout_s)

    async def close(self) -> None:
        await self.drain()
        for lane in list(self._lanes):
            lane.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self._timeout_s)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._channel is not None:
            await self._channel.close()
        if self._streams is not None:
            await self._streams.close()

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self._timeout_s

    async def _serve(self, ep: Any) -> None:
        lane = Lane(ep, "incoming", self._timeout_s)
        task = asyncio.current_task()
        assert task is not None
        self._lanes.add(lane)
        self._tasks.add(task)
        try:
            kind, body = await lane.recv_message(0, Slot.REQUEST_HEADER, self._deadline())
            if kind != Kind.HELLO:
                raise KVTransferError(f"expected HELLO, got {kind.name}")
            reader = BodyReader(body)
            peer_host_id, peer_worker_address = reader.blob().decode(), reader.blob()
            lane.peer_caps = reader.u64() if reader.remaining() else 0
            caps = self._caps
            if lane.peer_caps & CAP_CMA_SOURCE and reader.remaining():
                pid, probe_addr, probe = reader.u64(), reader.u64(), reader.blob()
                if self._cma is not None and self._cma_peer(peer_host_id) and self._cma.probe(pid, probe_addr, probe):
                    lane.cma_pid = pid
                    self._cma_pids.add(pid)
                    caps |= CAP_CMA_READ
            if self._streams is not None and self._streams.port:
                caps |= CAP_STREAM
            reply_body = BodyWriter().u64(caps)
            if caps & CAP_CMA_READ:  # where OPEN_CMA may go without UCX ("": over the lanes)
                reply_body.blob(self._channel.name.encode() if self._channel is not None else b"")
            if self._streams is not None and self._streams.port:
                reply_body.u64(self._streams.port)  # where OPEN_STREAM goes
            reply = self._hello_body + reply_body.build()
            await lane.send_message(0, Slot.REPLY_HEADER, Kind.HELLO_REPLY, reply, self._deadline())
            await self._attach_data_endpoint(lane, peer_host_id, peer_worker_address)
            logger.debug("accepted %r from host %s", lane, peer_host_id)
            seq = 1
            while not lane.broken:
                kind, body = await lane.recv_message(seq, Slot.REQUEST_HEADER, None)  # idle: no deadline
                try:
                    await self._handle(lane, seq, kind, body)
                except TransferRejected as exc:
                    self._stats.num_rejected += 1
                    logger.info("%r: rejected %s: %s", lane, kind.name, exc)
                    await lane.send_message(seq, Slot.REPLY_HEADER, Kind.REJECT, str(exc).encode(), self._deadline())
                seq += 1
        except KVTransferError as exc:
            logger.debug("%r closed: %s", lane, exc)
        except asyncio.CancelledError:
            pass
        finally:
            lane.abort()
            self._lanes.discard(lane)
            self._tasks.discard(task)

    async def _handle(self, lane: Lane, seq: int, kind: Kind, body: bytes | bytearray) -> None:
        reader = BodyReader(body)
        if kind == Kind.OPEN:
            token, claim, pieces = reader.blob(), reader.regions(), reader.regions()
            reader.finish()
            push_id, push = self._registry.open_push(token, claim, pieces)
            await self._receive(lane, seq, push_id, push, pieces)
        elif kind == Kind.DATA:
            push_id, pieces = reader.u64(), reader.regions()
            reader.finish()
            await self._receive(lane, seq, push_id, self._registry.data_push(push_id, pieces), pieces)
        elif kind == Kind.OPEN_READ and self._rma is not None:
            token, claim, rkey, src_base = reader.blob(), reader.regions(), reader.blob(), reader.u64()
            pieces, src_pieces = reader.regions(), reader.regions()
            reader.finish()
            if len(pieces) != len(src_pieces) or any(d[1] != s[1] for d, s in zip(pieces, src_pieces)):
                raise KVTransferError("OPEN_READ: destination and source pieces differ")
            _, push = self._registry.open_push(token, claim, pieces)
            await self._read(lane, seq, push, rkey, src_base, pieces, src_pieces)
        elif kind == Kind.OPEN_CMA and lane.cma_pid:
            reply_kind, reply = await self.serve_cma(lane.cma_pid, kind, body)
            await lane.send_message(seq, Slot.REPLY_HEADER, reply_kind, reply, self._deadline())
            if reply_kind == Kind.FAILED:
                raise KVTransferError(f"OPEN_CMA failed: {reply.decode(errors='replace')}")
        elif kind == Kind.PULL:
            token, tag_base, pieces = reader.blob(), reader.u64(), reader.regions()
            reader.finish()
            await self._serve_pull(lane, seq, token, tag_base, pieces)
        else:
            raise KVTransferError(f"unexpected request {kind.name}")

    async def _receive(self, lane: Lane, seq: int, push_id: int, push: Push, pieces: list[tuple[int, int]]) -> None:
        """Posts receives straight into the expectation's buffer, says READY, waits for the payload, says DONE."""
        started = time.perf_counter()
        exp = push.expectation
        tag_base = new_payload_tag_base()
        exp.lanes.add(lane)
        batch = waiter = None
        try:
            if self._ucp is not None and len(pieces) > 1:  # all but the last piece posted into libucp now
                batch = TagBatch(self._ucp)
                exp.lanes.add(batch)
                for i, (offset, nbytes) in enumerate(pieces[:-1]):
                    batch.recv(exp.memory.ptr + offset, nbytes, tag_base | i)
                offset, nbytes = pieces[-1]
                waiter = self._track(exp.token, batch.finish(
                    lane.recv_payload(exp.memory.slice(offset, nbytes), tag_base | (len(pieces) - 1)), exp.deadline))
                recvs: list[Any] = [asyncio.shield(waiter)]
            else:
                recvs = [asyncio.ensure_future(lane.recv_payload(exp.memory.slice(offset, nbytes), tag_base | i))
                         for i, (offset, nbytes) in enumerate(pieces)]
            ready = BodyWriter().u64(push_id).u64(tag_base).build()
            await lane.send_message(seq, Slot.REPLY_HEADER, Kind.READY, ready, exp.deadline)
            await gather_or_fail(recvs, exp.deadline, f"{lane!r} receive payload")
            if exp.error is not None:
                raise exp.error
        except BaseException as exc:
            lane.abort()  # cancels the receives still posted into the buffer
            if batch is not None:
                batch.abort()  # our own receives (worker-wide in UCP): cancelled, then waited for
                if waiter is not None:
                    await asyncio.wait([waiter], timeout=CANCEL_WAIT_S + 1.0)
            raise self._fail(exp, exc) from exc
        finally:
            exp.lanes.discard(lane)
            if batch is not None:
                exp.lanes.discard(batch)
            self._stats.seconds_receiving += time.perf_counter() - started
        await self._landed(lane, seq, Slot.FINAL_HEADER, exp, pieces)

    def _fail(self, exp: Expectation, exc: BaseException) -> KVTransferError:
        """Fails the expectation a served push broke (a timeout stays a timeout); returns the error to raise."""
        error_type = KVTransferTimeout if isinstance(exc, KVTransferTimeout) else KVTransferError
        self._registry.finish_expectation(exp.token, error_type(f"push failed: {exc}"))
        return KVTransferError(f"push failed: {exc}")

    async def _landed(self, lane: Lane, seq: int, slot: Slot, exp: Expectation, pieces: list[tuple[int, int]]) -> None:
        """A served push's pieces are all in the buffer: counts them, finishes the expectation once whole, says DONE."""
        nbytes = self._count_landed(exp, pieces)
        await lane.send_message(seq, slot, Kind.DONE, BodyWriter().u64(nbytes).build(), self._deadline())

    def _count_landed(self, exp: Expectation, pieces: list[tuple[int, int]]) -> int:
        nbytes = sum(n for _, n in pieces)
        self._stats.bytes_received += nbytes
        self._stats.num_served += 1
        self._registry.land(exp, nbytes)
        return nbytes

    async def _read(self, lane: Lane, seq: int, push: Push, rkey: bytes, src_base: int,
                    pieces: list[tuple[int, int]], src_pieces: list[tuple[int, int]]) -> None:
        """Reads the sender's pieces straight into the expectation's buffer (one batch of UCX RMA GETs on a worker
        thread, after the token check), then says DONE; any failure aborts the lane and fails the expectation."""
        assert self._rma is not None
        started = time.perf_counter()
        exp = push.expectation
        batch = ReadBatch(lane.abort, asyncio.get_running_loop())
        reads = [(exp.memory.ptr + offset, src_base + src_offset, nbytes)
                 for (offset, nbytes), (src_offset, _) in zip(pieces, src_pieces)]
        future = self._track(exp.token, asyncio.to_thread(
            self._rma.read, lane.data_out.ucp_endpoint, rkey, reads, self._local_memh(exp.memory), batch))
        exp.lanes.add(batch)
        try:
            await bounded(asyncio.shield(future), exp.deadline, f"{lane!r} read payload")
            if exp.error is not None:
                raise exp.error
        except BaseException as exc:
            batch.abort()  # stops posting; the lane (and reads in flight) go once posting stopped
            await asyncio.wait([future], timeout=self._timeout_s)
            raise self._fail(exp, exc) from exc
        finally:
            exp.lanes.discard(batch)
            self._stats.seconds_receiving += time.perf_counter() - started
        await self._landed(lane, seq, Slot.REPLY_HEADER, exp, pieces)

    async def serve_cma(self, pid: int, kind: Kind, body: bytes | bytearray) -> tuple[Kind, bytes]:
        """OPEN_CMA{token, dst regions, dst pieces, src pieces} from process `pid` (over a lane or the CMA channel):
        checks the token and regions as for OPEN, copies the pieces out of the sender's memory by CMA (small reads on
        the loop, large ones on threads in chunks, stopped by a cancel) -> (DONE, nbytes); (REJECT, reason) before
        reading anything; (UNSUPPORTED, reason) for a device destination, nothing checked; (FAILED, reason) when the
        read broke (the sender died, a bad address), the expectation failed with it."""
        if kind != Kind.OPEN_CMA or self._cma is None:
            return Kind.FAILED, f"unexpected request {kind.name}".encode()
        try:
            reader = BodyReader(body)
            token, claim, pieces, src_pieces = reader.blob(), reader.regions(), reader.regions(), reader.regions()
            reader.finish()
            if len(pieces) != len(src_pieces) or any(d[1] != s[1] for d, s in zip(pieces, src_pieces)):
                raise KVTransferError("OPEN_CMA: destination and source pieces differ")
            memory = self._registry.expectation_memory(token)
            if memory is not None and memory.is_device:  # nothing checked or claimed: the sender sends tagged
                return Kind.UNSUPPORTED, b"device memory"
            _, push = self._registry.open_push(token, claim, pieces)
        except TransferRejected as exc:
            self._stats.num_rejected += 1
            logger.info("process %d: rejected OPEN_CMA: %s", pid, exc)
            return Kind.REJECT, str(exc).encode()
        except KVTransferError as exc:
            return Kind.FAILED, str(exc).encode()
        started = time.perf_counter()
        exp = push.expectation
        reads = [(exp.memory.ptr + offset, src, nbytes) for (offset, nbytes), (src, _) in zip(pieces, src_pieces)]
        nbytes = sum(n for _, n in pieces)
        try:
            if nbytes <= CMA_INLINE_BYTES:
                self._cma.read(pid, reads)
            else:
                await self._cma_read_threads(pid, exp, reads, nbytes)
        except BaseException as exc:
            error = self._fail(exp, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return Kind.FAILED, str(error).encode()
        finally:
            self._stats.seconds_receiving += time.perf_counter() - started
        self._count_landed(exp, pieces)
        return Kind.DONE, BodyWriter().u64(nbytes).build()

    async def serve_stream(self, sock: socket.socket, kind: Kind, body: bytes) -> tuple[Kind, bytes]:
        """OPEN_STREAM{token, dst regions, dst pieces} with the pieces' bytes behind it on `sock`: checks the token
        and regions as for OPEN, then reads the payload straight into the expectation's buffer on a thread -> (DONE,
        nbytes); a refused request's payload is read and dropped -> (REJECT | UNSUPPORTED, reason); (FAILED, reason)
        when the payload broke off (the sender died) or the request is garbage: the connection then closes."""
        loop = asyncio.get_running_loop()
        try:
            if kind != Kind.OPEN_STREAM:
                raise KVTransferError(f"unexpected request {kind.name}")
            reader = BodyReader(body)
            token, claim, pieces = reader.blob(), reader.regions(), reader.regions()
            reader.finish()
            total = sum(n for _, n in pieces)
            if any(n <= 0 for _, n in pieces):
                raise KVTransferError("OPEN_STREAM: empty piece")
        except KVTransferError as exc:
            return Kind.FAILED, str(exc).encode()
        refusal: tuple[Kind, bytes] | None = None
        memory = self._registry.expectation_memory(token)
        push: Push | None = None
        if memory is not None and memory.is_device:
            refusal = (Kind.UNSUPPORTED, b"device memory")
        else:
            try:
                _, push = self._registry.open_push(token, claim, pieces)
            except TransferRejected as exc:
                self._stats.num_rejected += 1
                logger.info("stream: rejected OPEN_STREAM: %s", exc)
                refusal = (Kind.REJECT, str(exc).encode())
        if refusal is not None or push is None:
            try:
                await asyncio.to_thread(drain, sock, total, time.monotonic() + self._timeout_s)
            except KVTransferError as exc:
                return Kind.FAILED, str(exc).encode()
            return refusal or (Kind.FAILED, b"no push")
        started = time.perf_counter()
        exp = push.expectation
        host_view = exp.memory.host_view
        assert host_view is not None
        views = [memoryview(host_view[offset:offset + nbytes]) for offset, nbytes in pieces]
        stopper = _ShutDown(sock)
        exp.lanes.add(stopper)
        future = self._track(exp.token, asyncio.to_thread(
            recv_into_all, sock, views, time.monotonic() + max(0.0, exp.deadline - loop.time())))
        try:
            await asyncio.shield(future)
            if exp.error is not None:
                raise exp.error
        except BaseException as exc:
            stopper.abort()
            await asyncio.wait([future], timeout=self._timeout_s)
            error = self._fail(exp, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return Kind.FAILED, str(error).encode()
        finally:
            exp.lanes.discard(stopper)
            self._stats.seconds_receiving += time.perf_counter() - started
        self._count_landed(exp, pieces)
        return Kind.DONE, BodyWriter().u64(total).build()

    async def _cma_read_threads(self, pid: int, exp: Expectation, reads: list[tuple[int, int, int]],
                                nbytes: int) -> None:
        """The reads split by bytes over up to cma_threads threads; cancel or expiry stops them between chunks, and
        this returns only once every thread stopped (nothing lands after)."""
        assert self._cma is not None
        cma = self._cma
        parts: list[list[tuple[int, int, int]]] = [[] for _ in range(self._cma_threads)]
        share = -(-nbytes // len(parts))
        part, filled = 0, 0
        for local, remote, n in reads:  # cut at byte boundaries so every thread gets about the same share
            while n > 0:
                take = min(n, share - filled) if part < len(parts) - 1 else n
                parts[part].append((local, remote, take))
                local, remote, n, filled = local + take, remote + take, n - take, filled + take
                if filled >= share and part < len(parts) - 1:
                    part, filled = part + 1, 0
        batch = CmaBatch()

        def read(part_reads: list[tuple[int, int, int]]) -> None:
            try:
                cma.read(pid, part_reads, batch.stop)
            except BaseException:
                batch.abort()  # the other threads stop too
                raise

        async def read_all() -> None:  # returns only once every thread returned
            results = await asyncio.gather(*(asyncio.to_thread(read, p) for p in parts if p), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result

        exp.lanes.add(batch)
        future = self._track(exp.token, read_all())
        try:
            await bounded(asyncio.shield(future), exp.deadline, "CMA read")
            if exp.error is not None:
                raise exp.error
        except BaseException:
            batch.abort()
            await asyncio.wait([future], timeout=self._timeout_s)
            raise
        finally:
            exp.lanes.discard(batch)

    async def _serve_pull(self, lane: Lane, seq: int, token: bytes, tag_base: int,
                          pieces: list[tuple[int, int]]) -> None:
        """Says READY and sends the exposed pieces with the puller's tags (it posts the receives)."""
        started = time.perf_counter()
        exposure = self._registry.exposure_for(token, pieces)
        deadline = self._deadline()
        exposure.lanes.add(lane)
        try:
            ready = BodyWriter().u64(0).u64(tag_base).build()
            await lane.send_message(seq, Slot.REPLY_HEADER, Kind.READY, ready, deadline)
            if self._ucp is not None and len(pieces) > 1:
                batch = TagBatch(self._ucp)
                ep = lane.data_out.ucp_endpoint
                for i, (offset, nbytes) in enumerate(pieces[:-1]):
                    batch.send(ep, exposure.memory.ptr + offset, nbytes, tag_base | i)
                offset, nbytes = pieces[-1]
                sends: list[Any] = [batch.finish(lane.send_payload(exposure.memory.slice(offset, nbytes),
                                                                   tag_base | (len(pieces) - 1)), deadline)]
            else:
                sends = [lane.send_payload(exposure.memory.slice(offset, nbytes), tag_base | i)
                         for i, (offset, nbytes) in enumerate(pieces)]
            await gather_or_fail(sends, deadline, f"{lane!r} serve pull")
        except BaseException:
            lane.abort()
            self._stats.num_failures += 1
            raise
        finally:
            exposure.lanes.discard(lane)
            self._stats.seconds_sending += time.perf_counter() - started
        nbytes = sum(n for _, n in pieces)
        exposure.num_reads += 1
        exposure.bytes_served += nbytes
        self._stats.bytes_sent += nbytes
        self._stats.num_served += 1


class _ShutDown:
    """A stream receiving into an expectation (an `Abortable`): abort() shuts the socket, so the read stops."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def abort(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
