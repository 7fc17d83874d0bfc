"""Pushes to peers on other hosts over plain TCP streams (the UCX backend's path for host memory where no RDMA is
offered): the sender writes OPEN_STREAM{token, dst regions, pieces} and the payload right behind it; the receiver
reads the request, checks the token and regions, and only then reads the payload off the socket straight into the
expectation's buffer (a rejected request's payload is read into scratch and dropped), and answers DONE / REJECT /
UNSUPPORTED (device destination: the sender pushes tagged over UCX) / FAILED.

Why not UCX's TCP: it moves a tagged message as a rendezvous of copy-in/copy-out fragments through its progress
thread, after an OPEN -> READY round trip through ucxx's threads (traced 2026-12-02 15:52 UTC across two netns hosts:
about 0.4 ms per control message, 1.6-2.5 ms for 4 MiB of payload). Here the payload is one kernel copy on each side
and the push one round trip. A killed sender makes the receiver's read fail (the expectation fails, the receiver
lives); a killed receiver makes the send or the reply wait fail.

    server = StreamServer(serve); port = await server.start(); await server.close()
    # serve(sock, kind, body) -> (reply kind, reply body): ucx_server.TransferServer.serve_stream
    pool = StreamPool(host, port, max_conns); kind, body = await pool.request(kind, body, payload_views, deadline)
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Sequence

from pdserve.errors import KVTransferError, KVTransferTimeout

from .ucx_lane import bounded
from .wire import MAX_BODY_BYTES, Kind

logger = logging.getLogger(__name__)

FRAME = struct.Struct("<IHHQQ")  # magic, kind, reserved, request id (unused: one request at a time), body length
MAGIC = 0x50445453  # "PDTS"
DRAIN_BYTES = 4 << 20  # scratch for a rejected request's payload
Serve = Callable[[socket.socket, Kind, bytes], Awaitable[tuple[Kind, bytes]]]


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _recv_exact(sock: socket.socket, nbytes: int, deadline: float | None) -> bytes:
    loop = asyncio.get_running_loop()
    buf = bytearray(nbytes)
    view = memoryview(buf)
    got = 0
    while got < nbytes:
        n = await bounded(loop.sock_recv_into(sock, view[got:]), deadline, "stream recv")
        if n == 0:
            raise KVTransferError("stream closed by the peer")
        got += n
    return bytes(buf)


async def read_frame(sock: socket.socket, deadline: float | None) -> tuple[Kind, bytes]:
    magic, kind, _, _, body_len = FRAME.unpack(await _recv_exact(sock, FRAME.size, deadline))
    if magic != MAGIC or body_len > MAX_BODY_BYTES:
        raise KVTransferError(f"bad stream frame (magic {magic:#x}, body {body_len} B)")
    try:
        return Kind(kind), await _recv_exact(sock, body_len, deadline)
    except ValueError:
        raise KVTransferError(f"unknown message kind {kind}") from None


def frame(kind: Kind, body: bytes) -> bytes:
    return FRAME.pack(MAGIC, kind, 0, 0, len(body)) + body


IOV_BATCH = 1024  # buffers per sendmsg / recvmsg_into call


def _blocking(sock: socket.socket, deadline_mono: float) -> None:
    """Puts `sock` in blocking mode with kernel timeouts until the deadline: a thread then moves a whole batch of
    buffers per syscall (MSG_WAITALL), waking neither Python nor the event loop per TCP segment."""
    timeout = deadline_mono - time.monotonic()
    if timeout <= 0:
        raise KVTransferTimeout("stream: timed out")
    sock.setblocking(True)
    tv = struct.pack("ll", int(timeout), int((timeout % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _move(sock: socket.socket, views: Sequence[memoryview], deadline_mono: float, send: bool) -> None:
    """Blocking (run on a thread): sends every view, or fills every view from the socket, in order."""
    what = "send" if send else "payload"
    pending = [v for v in views if len(v)]
    try:
        _blocking(sock, deadline_mono)
        while pending:
            batch = pending[:IOV_BATCH]
            if send:
                n = sock.sendmsg(batch)
            else:
                n = sock.recvmsg_into(batch, 0, socket.MSG_WAITALL)[0]
                if n == 0:
                    raise KVTransferError("stream closed by the peer mid-payload")
            done = 0  # drop what moved; a partly moved view goes on from where it stopped
            while done < len(batch) and n >= len(batch[done]):
                n -= len(batch[done])
                done += 1
            rest = pending[done:]
            if n:
                rest[0] = rest[0][n:]
            pending = rest
            if pending and time.monotonic() > deadline_mono:
                raise KVTransferTimeout(f"stream {what}: timed out")
    except (BlockingIOError, socket.timeout):
        raise KVTransferTimeout(f"stream {what}: timed out") from None
    except OSError as exc:
        raise KVTransferError(f"stream {what}: {exc}") from exc
    finally:
        sock.setblocking(False)


def recv_into_all(sock: socket.socket, views: Sequence[memoryview], deadline_mono: float) -> None:
    """Blocking (run on a thread): fills every view from the socket, in order; KVTransferError on EOF or failure."""
    _move(sock, views, deadline_mono, send=False)


def send_all(sock: socket.socket, buffers: Sequence[memoryview], deadline_mono: float) -> None:
    """Blocking (run on a thread): writes every buffer in order; KVTransferError on failure."""
    _move(sock, buffers, deadline_mono, send=True)


def drain(sock: socket.socket, nbytes: int, deadline_mono: float) -> None:
    """Blocking: reads and drops `nbytes` (the payload of a request that was refused)."""
    scratch = memoryview(bytearray(min(nbytes, DRAIN_BYTES) or 1))
    left = nbytes
    while left > 0:
        take = min(left, len(scratch))
        recv_into_all(sock, [scratch[:take]], deadline_mono)
        left -= take


class StreamServer:
    """Accepts stream connections on all interfaces and serves their requests one at a time per connection."""

    def __init__(self, serve: Serve) -> None:
        self._serve = serve
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", 0))
        sock.listen(64)
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._tasks.add(asyncio.ensure_future(self._accept_loop(sock)))
        return self.port

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            conn.setblocking(False)
            _tune(conn)
            task = asyncio.ensure_future(self._connection(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connection(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                kind, body = await read_frame(conn, None)  # idle: no deadline
                reply_kind, reply = await self._serve(conn, kind, body)
                await loop.sock_sendall(conn, frame(reply_kind, reply))
                if reply_kind == Kind.FAILED:
                    return  # the payload may be half read: the stream cannot go on
        except (KVTransferError, ConnectionError, OSError, asyncio.CancelledError) as exc:
            logger.debug("stream connection closed: %r", exc)
        finally:
            conn.close()


class StreamPool:
    """Up to `max_conns` connections to one peer's StreamServer; a request checks one out (one request at a time)."""

    def __init__(self, host: str, port: int, max_conns: int) -> None:
        self.host, self.port = host, port
        self._idle: list[socket.socket] = []
        self._open = 0
        self._max = max_conns
        self._changed = asyncio.Condition()

    async def _acquire(self, deadline: float) -> socket.socket:
        while not self._idle and self._open >= self._max:
            async with self._changed:
                await bounded(self._changed.wait(), deadline, f"waiting for a stream to {self.host}")
        if self._idle:
            return self._idle.pop()
        self._open += 1
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            _tune(sock)
            await bounded(asyncio.get_running_loop().sock_connect(sock, (self.host, self.port)), deadline,
                          f"stream connect to {self.host}:{self.port}")
            return sock
        except BaseException:
            self._open -= 1
            raise

    async def _release(self, sock: socket.socket, clean: bool) -> None:
        if clean:
            self._idle.append(sock)
        else:
            sock.close()
            self._open -= 1
        async with self._changed:
            self._changed.notify_all()

    async def request(self, kind: Kind, body: bytes, payload: Sequence[memoryview], deadline: float) -> tuple[Kind, bytes]:
        """Sends the request and its payload, returns the reply; the connection is dropped on any failure."""
        sock = await self._acquire(deadline)
        loop = asyncio.get_running_loop()
        deadline_mono = time.monotonic() + max(0.0, deadline - loop.time())
        clean = False
        # The thread owns the (then blocking) socket until the payload went; the receiver replies only after it read or
        # dropped the whole payload, so the loop waits for the reply after that.
        send = asyncio.ensure_future(asyncio.to_thread(
            send_all, sock, [memoryview(frame(kind, body)), *payload], deadline_mono))
        try:
            await bounded(asyncio.shield(send), deadline, "stream send")
            reply = await read_frame(sock, deadline)
            if reply[0] == Kind.FAILED:
                raise KVTransferError(f"{self.host}: push failed: {reply[1].decode(errors='replace')}")
            clean = True
            return reply
        except BaseException:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # the sending thread stops; it is waited for before the close
            except OSError:
                pass
            await asyncio.wait([send], timeout=5.0)
            if send.done() and not send.cancelled():
                send.exception()
            raise
        finally:
            await self._release(sock, clean)

    def close(self) -> None:
        for sock in self._idle:
            sock.close()
        self._idle.clear()
