"""The Mooncake Transfer Engine backend of `KVTransport` (base.py), over TCP (PyPI `mooncake-transfer-engine-non-cuda`).

Mooncake's engine moves bytes one-sidedly between registered memory of two engines and authorises nothing itself, so
this backend adds the same thin control layer the UCX backend has: a small TCP control channel (wire.py framing)
and the shared TokenRegistry (tokens.py). The side whose memory the token guards always drives the engine, so every
byte that lands under a token was checked first and nothing lands once `cancel` returns:

- push: the sender sends OPEN{token, its engine session, dst regions, matching src addresses}; the receiver checks the
  token and regions (TransferRejected before any byte moves), then has its own engine READ the sender's registered
  memory straight into the expected regions, and answers DONE{nbytes} or FAILED{reason};
- pull: the reader sends PULL{token, session, src regions, dst addresses}; the owner checks its exposure and has its
  engine WRITE into the reader's registered memory, then answers DONE or FAILED.

An engine call cannot be cut off mid-way: expiry or cancel fail the expectation at once, and `cancel`/`close` wait
(bounded by the engine's own MC_TRANSFER_TIMEOUT, set to this transport's timeout) for engine calls still in flight
under the token. Mooncake's TCP transport serves any peer that can reach its port and names registered addresses:
the tokens guard our protocol's transfers (late, foreign, replayed), not memory from a hostile host on the network.
Host memory only (the non-CUDA build): device memory is refused when registered.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from pdserve.errors import InvalidRequest, KVTransferError, KVTransferTimeout, PeerUnavailable

from .base import TransferRejected
from .buffers import TransportCore
from .memory import memory_of
from .regions import Region, check_regions, pair_regions, total_bytes
from .tokens import Expectation, Exposure
from .wire import HEADER, MAGIC, MAX_BODY_BYTES, BodyReader, BodyWriter, Kind

logger = logging.getLogger(__name__)

T = TypeVar("T")
PACKAGE = "mooncake-transfer-engine-non-cuda"


def import_engine() -> Any:
    """Mooncake's TransferEngine class; RuntimeError saying what to install when it is missing."""
    # The engine's INFO/WARNING lines (several per engine and peer) are noise here; errors still show.
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    try:
        from mooncake.engine import TransferEngine
    except ImportError as exc:
        raise RuntimeError(f"--kv-transport mooncake needs {PACKAGE} (pip install 'pdserve[mooncake]') and the "
                           f"libibverbs1 system library it links against: {exc}") from exc
    return TransferEngine


class _EngineCall:
    """One engine call in flight under a token; Expectation/Exposure abort() cannot stop it (it only marks it)."""

    def __init__(self, future: asyncio.Future[int]) -> None:
        self.future = future
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


async def _bounded(aw: Awaitable[T], deadline: float, what: str) -> T:
    remaining = deadline - asyncio.get_running_loop().time()
    try:
        if remaining <= 0:
            raise asyncio.TimeoutError
        return await asyncio.wait_for(aw, remaining)
    except asyncio.TimeoutError:
        raise KVTransferTimeout(f"{what}: timed out") from None
    except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
        raise KVTransferError(f"{what}: {type(exc).__name__}: {exc}") from exc


class _Control:
    """One control connection: request/reply frames (wire.HEADER + body), one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.seq = 0
        self.broken = False

    async def send(self, seq: int, kind: Kind, body: bytes) -> None:
        self.writer.write(HEADER.pack(MAGIC, kind, 0, seq, len(body)) + body)
        await self.writer.drain()

    async def recv(self, expected_seq: int) -> tuple[Kind, bytes]:
        magic, kind, _, seq, body_len = HEADER.unpack(await self.reader.readexactly(HEADER.size))
        if magic != MAGIC or seq != expected_seq or body_len > MAX_BODY_BYTES:
            raise KVTransferError(f"bad control header from {self.peer} (seq {seq} != {expected_seq})")
        try:
            return Kind(kind), await self.reader.readexactly(body_len)
        except ValueError:
            raise KVTransferError(f"unknown message kind {kind} from {self.peer}") from None

    def close(self) -> None:
        self.broken = True
        self.writer.close()


class MooncakeTransport(TransportCore):
    """One per process: a Mooncake TransferEngine (TCP), its control listener and idle control connections."""

    name = "mooncake"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, timeout_s: float = 30.0,
                 max_piece_bytes: int = 64 << 20) -> None:
        if timeout_s <= 0 or max_piece_bytes < 1:
            raise ValueError("timeout_s and max_piece_bytes must be positive")
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.max_piece_bytes = max_piece_bytes  # one engine request per this many bytes at most
        super().__init__()
        self._engine: Any = None
        self._session = ""  # "host:rpc_port" peers name this engine by
        self._server: asyncio.base_events.Server | None = None
        self._idle: dict[str, list[_Control]] = {}  # peer -> idle control connections
        self._served: set[_Control] = set()
        self._inflight: dict[bytes, set[_EngineCall]] = {}  # token -> engine calls under it

    # ---- lifecycle -------------------------------------------------------------------------------
    def _ensure_engine(self) -> Any:
        if self._engine is None:
            # The engine reads its per-request timeout from the environment when it starts.
            os.environ.setdefault("MC_TRANSFER_TIMEOUT", str(max(1, round(self.timeout_s))))
            engine = import_engine()()
            rc = engine.initialize(self.host, "P2PHANDSHAKE", "tcp", "")
            if rc != 0:
                raise RuntimeError(f"Mooncake TransferEngine.initialize({self.host!r}, P2PHANDSHAKE, tcp) returned {rc}")
            self._engine = engine
            self._session = f"{self.host}:{engine.get_rpc_port()}"
        return self._engine

    async def start(self) -> None:
        self._ensure_engine()
        # Like the UCX listener, the control listener accepts on every interface; `host` is what peers are told.
        self._server = await asyncio.start_server(self._serve, host="0.0.0.0", port=self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("mooncake transport: control %s, engine session %s", self.address, self._session)

    async def close(self) -> None:
        self._registry.close("transfer agent closed")
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        for conn in list(self._served):
            conn.close()
        if self._server is not None:
            self._server.close()
            self._server = None
        await self._drain(list(self._inflight))

    @property
    def address(self) -> str:
        if self._server is None:
            raise RuntimeError("MooncakeTransport.start() was not called")
        return f"{self.host}:{self.port}"

    # ---- buffers and tokens ----------------------------------------------------------------------
    def register_buffer(self, name: str, buf: object) -> None:
        memory = memory_of(buf)
        if memory.is_device:
            raise InvalidRequest(f"the mooncake transport ({PACKAGE}, TCP) cannot move {memory.device} memory; "
                                 f"use --kv-transport ucx for device memory")
        if name in self._buffers:
            self.unregister_buffer(name)
        rc = self._ensure_engine().register_memory(memory.ptr, memory.nbytes)
        if rc != 0:
            raise RuntimeError(f"Mooncake register_memory of {memory.nbytes} bytes ({name!r}) returned {rc}")
        self._buffers[name] = memory

    def unregister_buffer(self, name: str) -> None:
        memory = self._buffers.pop(name, None)
        if memory is not None and self._engine is not None:
            self._engine.unregister_memory(memory.ptr)

    async def cancel(self, token: bytes) -> None:
        """Drops the token's expectation or exposure, then waits for engine calls still moving bytes under it."""
        self._registry.cancel(token)
        await self._drain([token])

    def retire(self, token: bytes) -> None:
        self._registry.retire(token)  # engine calls in flight finish by themselves

    async def _drain(self, tokens: list[bytes]) -> None:
        calls = [call.future for token in tokens for call in self._inflight.get(token, ())]
        if calls:
            # The engine gives up by itself after MC_TRANSFER_TIMEOUT; one more second covers the thread's return.
            _, pending = await asyncio.wait(calls, timeout=self.timeout_s + 1.0)
            if pending:
                logger.error("%d Mooncake engine call(s) still running after %.0f s", len(pending), self.timeout_s)

    # ---- requester side (push / pull) -----------------------------------------------------------
    async def _connect(self, peer: str, deadline: float) -> _Control:
        idle = self._idle.get(peer)
        if idle:
            return idle.pop()
        host, _, port = peer.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidRequest(f"peer address must be host:port, got {peer!r}")
        try:
            reader, writer = await _bounded(asyncio.open_connection(host, int(port)), deadline, f"connect to {peer}")
        except KVTransferError as exc:
            raise PeerUnavailable(f"cannot connect to transfer peer {peer}: {exc}") from exc
        return _Control(reader, writer, peer)

    async def _request(self, peer: str, kind: Kind, body: bytes, deadline: float) -> int:
        """Sends one request, returns DONE's byte count; REJECT -> TransferRejected, FAILED -> KVTransferError."""
        conn = await self._connect(peer, deadline)
        reusable = False
        try:
            conn.seq += 1
            await _bounded(conn.send(conn.seq, kind, body), deadline, f"send {kind.name} to {peer}")
            reply, payload = await _bounded(conn.recv(conn.seq), deadline, f"{kind.name} reply from {peer}")
            reusable = True
            if reply == Kind.REJECT:
                raise TransferRejected(f"{peer} rejected {kind.name}: {payload.decode(errors='replace')}")
            if reply == Kind.FAILED:
                raise KVTransferError(f"{peer}: {kind.name} failed: {payload.decode(errors='replace')}")
            if reply != Kind.DONE:
                reusable = False
                raise KVTransferError(f"{peer} answered {kind.name} with {reply.name}")
            reader = BodyReader(payload)
            nbytes = reader.u64()
            reader.finish()
            return nbytes
        finally:
            if reusable and self._server is not None:
                self._idle.setdefault(peer, []).append(conn)
            else:
                conn.close()

    async def push(self, peer: str, token: bytes, src_buffer: str, src_regions: Sequence[Region],
                   dst_regions: Sequence[Region], *, timeout_s: float | None = None) -> int:
        started = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + (self.timeout_s if timeout_s is None else timeout_s)
        memory = self._view(src_buffer)
        src = check_regions(src_regions, memory.nbytes, "push src")
        dst = check_regions(dst_regions, 1 << 62, "push dst")
        pieces = pair_regions(src, dst, self.max_piece_bytes)
        body = (BodyWriter().blob(token).blob(self._session.encode()).regions([(p.dst_offset, p.nbytes) for p in pieces])
                .regions([(memory.ptr + p.src_offset, p.nbytes) for p in pieces]).build())
        try:
            nbytes = await self._request(peer, Kind.OPEN, body, deadline)
        except BaseException as exc:
            self._count_error(exc)
            raise
        finally:
            self._stats.seconds_sending += time.perf_counter() - started
        self._stats.bytes_sent += nbytes
        self._stats.num_pushes += 1
        return nbytes

    async def pull(self, peer: str, token: bytes, dst_buffer: str, dst_regions: Sequence[Region],
                   src_regions: Sequence[Region], *, timeout_s: float | None = None) -> int:
        started = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + (self.timeout_s if timeout_s is None else timeout_s)
        memory = self._view(dst_buffer)
        dst = check_regions(dst_regions, memory.nbytes, "pull dst")
        src = check_regions(src_regions, 1 << 62, "pull src")
        pieces = pair_regions(src, dst, self.max_piece_bytes)
        body = (BodyWriter().blob(token).blob(self._session.encode()).regions([(p.src_offset, p.nbytes) for p in pieces])
                .regions([(memory.ptr + p.dst_offset, p.nbytes) for p in pieces]).build())
        try:
            nbytes = await self._request(peer, Kind.PULL, body, deadline)
        except BaseException as exc:
            self._count_error(exc)
            raise
        finally:
            self._stats.seconds_receiving += time.perf_counter() - started
        self._stats.bytes_received += nbytes
        self._stats.num_pulls += 1
        return nbytes

    # ---- serving side ---------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Control(reader, writer, "incoming")
        self._served.add(conn)
        seq = 0
        try:
            while not conn.broken:
                seq += 1
                try:
                    kind, body = await conn.recv(seq)  # idle: no deadline
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                try:
                    reply, payload = Kind.DONE, BodyWriter().u64(await self._handle(kind, body)).build()
                except TransferRejected as exc:
                    self._stats.num_rejected += 1
                    logger.info("mooncake transport: rejected %s: %s", kind.name, exc)
                    reply, payload = Kind.REJECT, str(exc).encode()
                except KVTransferError as exc:
                    reply, payload = Kind.FAILED, str(exc).encode()
                await conn.send(seq, reply, payload)
        except (KVTransferError, ConnectionError, asyncio.IncompleteReadError) as exc:
            logger.debug("mooncake control connection closed: %s", exc)
        except asyncio.CancelledError:
            pass
        finally:
            self._served.discard(conn)
            conn.close()

    async def _handle(self, kind: Kind, body: bytes) -> int:
        reader = BodyReader(body)
        token, session, local, remote = reader.blob(), reader.blob().decode(), reader.regions(), reader.regions()
        reader.finish()
        if len(local) != len(remote) or any(a[1] != b[1] for a, b in zip(local, remote)):
            raise KVTransferError("local and remote piece lists differ")
        if kind == Kind.OPEN:
            _, push = self._registry.open_push(token, local, local)  # TransferRejected before any byte moves
            return await self._receive(push.expectation, session, local, remote)
        if kind == Kind.PULL:
            exposure = self._registry.exposure_for(token, local)
            return await self._send(exposure, session, local, remote)
        raise KVTransferError(f"unexpected request {kind.name}")

    def _call(self, token: bytes, fn: Any, *args: Any) -> _EngineCall:
        """Runs a blocking engine call on a thread (it releases the GIL), tracked under `token` until it returns."""
        call = _EngineCall(asyncio.ensure_future(asyncio.to_thread(fn, *args)))
        calls = self._inflight.setdefault(token, set())
        calls.add(call)

        def forget(_: object) -> None:
            calls.discard(call)
            if not calls and self._inflight.get(token) is calls:
                del self._inflight[token]

        call.future.add_done_callback(forget)
        return call

    async def _receive(self, exp: Expectation, session: str, local: list[Region], remote: list[Region]) -> int:
        started = time.perf_counter()
        call = self._call(exp.token, self._engine.batch_transfer_sync_read, session,
                          [exp.memory.ptr + offset for offset, _ in local], [addr for addr, _ in remote],
                          [n for _, n in local])
        exp.lanes.add(call)
        try:
            rc = await asyncio.wait_for(asyncio.shield(call.future), max(0.0, exp.deadline - asyncio.get_running_loop().time()))
            if rc != 0:
                raise KVTransferError(f"Mooncake read from {session} returned {rc}")
            if exp.error is not None:
                raise exp.error
        except (asyncio.TimeoutError, KVTransferError) as exc:
            error: KVTransferError = (KVTransferTimeout(f"push timed out after {exp.nbytes} expected bytes")
                                      if isinstance(exc, asyncio.TimeoutError) else exc)
            self._registry.finish_expectation(exp.token, error)
            raise KVTransferError(f"push failed: {error}") from exc
        finally:
            exp.lanes.discard(call)
            self._stats.seconds_receiving += time.perf_counter() - started
        nbytes = total_bytes(local)
        self._stats.bytes_received += nbytes
        self._stats.num_served += 1
        self._registry.land(exp, nbytes)
        return nbytes

    async def _send(self, exposure: Exposure, session: str, local: list[Region], remote: list[Region]) -> int:
        started = time.perf_counter()
        call = self._call(exposure.token, self._engine.batch_transfer_sync_write, session,
                          [exposure.memory.ptr + offset for offset, _ in local], [addr for addr, _ in remote],
                          [n for _, n in local])
        exposure.lanes.add(call)
        try:
            rc = await asyncio.wait_for(asyncio.shield(call.future), self.timeout_s)
            if rc != 0:
                raise KVTransferError(f"Mooncake write to {session} returned {rc}")
        except asyncio.TimeoutError:
            self._stats.num_failures += 1
            raise KVTransferTimeout(f"pull by {session} timed out") from None
        except KVTransferError:
            self._stats.num_failures += 1
            raise
        finally:
            exposure.lanes.discard(call)
            self._stats.seconds_sending += time.perf_counter() - started
        nbytes = total_bytes(local)
        exposure.num_reads += 1
        exposure.bytes_served += nbytes
        self._stats.bytes_sent += nbytes
        self._stats.num_served += 1
        return nbytes
