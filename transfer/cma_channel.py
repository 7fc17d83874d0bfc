"""The control channel of same-host CMA pushes: a Unix stream socket between two transports that share a kernel and
a network namespace, carrying OPEN_CMA requests and their replies (DONE / REJECT / UNSUPPORTED / FAILED).

Why not the UCX lane: a message through ucxx wakes its progress thread, its notifier thread and then the event loop
(about 0.5 ms per message on this 2-core host, measured 2026-12-02 15:00 UTC), where a socket wakes only the
peer's event loop. The listener's name (abstract namespace) travels in HELLO_REPLY over the UCX lane, and only to a
client whose memory the listener proved it may read (the CMA probe); the listener accepts only connections whose
kernel-reported pid (SO_PEERCRED) is such a client. Requests are numbered and may overlap; a lost connection fails
every request waiting on it at once.

    server = ChannelServer(serve, allowed_pid); name = await server.start(); await server.close()
    # serve(pid, kind, body) -> (reply kind, reply body): ucx_server.TransferServer.serve_cma
    channel = await Channel.connect(name, deadline); kind, body = await channel.request(kind, body, deadline)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import socket
import struct
from collections.abc import Awaitable, Callable

from pdserve.errors import KVTransferError

from .ucx_lane import bounded
from .wire import MAX_BODY_BYTES, Kind

logger = logging.getLogger(__name__)

FRAME = struct.Struct("<IHHQQ")  # magic, kind, reserved, request id, body length
MAGIC = 0x50444343  # "PDCC"
Serve = Callable[[int, Kind, bytes], Awaitable[tuple[Kind, bytes]]]


def _frame(kind: Kind, request_id: int, body: bytes) -> bytes:
    return FRAME.pack(MAGIC, kind, 0, request_id, len(body)) + body


async def _read_frame(reader: asyncio.StreamReader) -> tuple[Kind, int, bytes]:
    magic, kind, _, request_id, body_len = FRAME.unpack(await reader.readexactly(FRAME.size))
    if magic != MAGIC or body_len > MAX_BODY_BYTES:
        raise KVTransferError(f"bad CMA channel frame (magic {magic:#x}, body {body_len} B)")
    try:
        return Kind(kind), request_id, await reader.readexactly(body_len)
    except ValueError:
        raise KVTransferError(f"unknown message kind {kind}") from None


class ChannelServer:
    """Accepts channels from clients that passed the CMA probe and serves their requests, each in its own task."""

    def __init__(self, serve: Serve, allowed_pid: Callable[[int], bool]) -> None:
        self._serve = serve
        self._allowed_pid = allowed_pid
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.name = ""

    async def start(self) -> str:
        """Listens on a fresh abstract-namespace name; returns it."""
        self.name = f"\0pdserve-transfer-{os.getpid()}-{secrets.token_hex(8)}"
        self._server = await asyncio.start_unix_server(self._accept, path=self.name)
        return self.name

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        running: set[asyncio.Task[None]] = set()
        try:
            sock = writer.get_extra_info("socket")
            pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if not self._allowed_pid(pid):
                logger.warning("CMA channel from process %d refused: it did not pass the CMA probe", pid)
                return
            while True:
                kind, request_id, body = await _read_frame(reader)
                request = asyncio.ensure_future(self._answer(pid, kind, request_id, body, writer))
                running.add(request)
                request.add_done_callback(running.discard)
        except (asyncio.IncompleteReadError, ConnectionError, KVTransferError, asyncio.CancelledError) as exc:
            logger.debug("CMA channel closed: %r", exc)
        finally:
            for request in list(running):
                request.cancel()
            writer.close()
            self._tasks.discard(task)

    async def _answer(self, pid: int, kind: Kind, request_id: int, body: bytes, writer: asyncio.StreamWriter) -> None:
        try:
            reply_kind, reply = await self._serve(pid, kind, body)
        except asyncio.CancelledError:
            return  # the channel closed: the expectation was failed by serve
        except Exception as exc:  # a bug in serve: the request fails, the channel stays
            logger.exception("CMA channel request failed")
            reply_kind, reply = Kind.FAILED, f"{type(exc).__name__}: {exc}".encode()
        if not writer.is_closing():
            writer.write(_frame(reply_kind, request_id, reply))


class Channel:
    """Client end: numbered requests over one connection, replies matched by number."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[tuple[Kind, bytes]]] = {}
        self.closed = False
        self._reader_task = asyncio.ensure_future(self._read_replies(reader))

    @classmethod
    async def connect(cls, name: str, deadline: float) -> Channel:
        reader, writer = await bounded(asyncio.open_unix_connection(path=name), deadline, "CMA channel connect")
        return cls(reader, writer)

    async def request(self, kind: Kind, body: bytes, deadline: float) -> tuple[Kind, bytes]:
        if self.closed:
            raise KVTransferError("CMA channel closed")
        request_id = next(self._ids)
        future: asyncio.Future[tuple[Kind, bytes]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            self._writer.write(_frame(kind, request_id, body))
            return await bounded(future, deadline, f"CMA channel {kind.name}")
        finally:
            self._waiting.pop(request_id, None)

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        error: BaseException = KVTransferError("CMA channel closed by the peer")
        try:
            while True:
                kind, request_id, body = await _read_frame(reader)
                future = self._waiting.get(request_id)
                if future is not None and not future.done():
                    future.set_result((kind, body))
        except (asyncio.IncompleteReadError, ConnectionError, KVTransferError) as exc:
            if isinstance(exc, KVTransferError):
                error = exc
        except asyncio.CancelledError:
            error = KVTransferError("CMA channel closed")
        finally:
            self._fail_all(error)

    def _fail_all(self, error: BaseException) -> None:
        self.closed = True
        self._writer.close()
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(KVTransferError(str(error)))

    def close(self) -> None:
        if not self.closed:
            self._reader_task.cancel()
            self._fail_all(KVTransferError("CMA channel closed"))
