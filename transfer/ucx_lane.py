"""One lane of the transfer layer (a ucxx control endpoint plus an optional shared-memory data endpoint)
and the per-peer pool of lanes.

Every wait here is bounded by a deadline on the event loop's clock; a lane that fails in any way is
aborted (which also cancels receives posted through it) and never reused.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from pdserve.errors import KVTransferError, KVTransferTimeout, PeerUnavailable

from .wire import CONTROL_BYTES, HEADER, MAGIC, Kind, Slot, message_tag, unpack_header

logger = logging.getLogger(__name__)

T = TypeVar("T")
ABORT_PERIOD_NS = 200_000_000  # 0.2 s: longest an abort may block waiting for the UCX progress thread
_lane_ids = itertools.count()  # only labels lanes in logs


async def bounded(aw: Awaitable[T], deadline: float | None, what: str) -> T:
    """Awaits `aw` until the loop-clock `deadline` (None: no bound); maps timeouts and UCX errors to typed errors."""
    remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
    try:
        if remaining is not None and remaining <= 0:
            raise asyncio.TimeoutError
        return await asyncio.wait_for(aw, remaining)
    except asyncio.TimeoutError:
        raise KVTransferTimeout(f"{what}: timed out") from None
    except (KVTransferError, asyncio.CancelledError):
        raise
    except Exception as exc:  # ucxx raises its own hierarchy (UCXError, UCXXError, ...) on peer failure
        raise KVTransferError(f"{what}: {type(exc).__name__}: {exc}") from exc


async def gather_or_fail(aws: Sequence[Awaitable[Any]], deadline: float | None, what: str) -> list[Any]:
    """All results, or the first error (the others are cancelled; the caller aborts the lane)."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        return await bounded(asyncio.gather(*tasks), deadline, what)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        for task in tasks:  # retrieve exceptions so asyncio never logs "exception was never retrieved"
            if task.done() and not task.cancelled():
                task.exception()


class Lane:
    """A control endpoint (ucxx, peer-failure detection on) and the endpoint payload goes out on.

    The data endpoint is a worker-address endpoint without UCX error handling when both ends are on
    one host: only then does UCX pick shared memory (sysv) and CMA zero-copy reads; otherwise it is the
    control endpoint itself. Payload receives are always posted through the control endpoint, so
    aborting the lane cancels them.
    """

    def __init__(self, ctrl: Any, peer: str, timeout_s: float) -> None:
        self.ctrl = ctrl
        self.data_out = ctrl
        self.peer = peer
        self.timeout_s = timeout_s
        self.lane_id = next(_lane_ids)
        self.broken = False
        self.closed = False
        self.peer_caps = 0  # the peer's HELLO capability flags (wire.CAP_*)
        self.cma_pid = 0  # server side: the client's pid when this lane serves OPEN_CMA (its probe read succeeded)
        self.cma_channel = ""  # client side: the peer's CMA channel name (cma_channel.py), "" if none
        self.stream_port = 0  # client side: the peer's TCP stream port (tcp_stream.py), 0 if none
        self._next_seq = 1  # seq 0 is the HELLO exchange

    def __repr__(self) -> str:
        shm = "shm" if self.data_out is not self.ctrl else "ctrl"
        return f"Lane#{self.lane_id}({self.peer}, {shm})"

    def next_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    async def send_message(self, seq: int, slot: Slot, kind: Kind, body: bytes, deadline: float | None) -> None:
        """One message (header + body inline) when it fits in CONTROL_BYTES, else the header then the body."""
        header = HEADER.pack(MAGIC, kind, 0, seq, len(body))
        if HEADER.size + len(body) <= CONTROL_BYTES:
            message = np.frombuffer(header + body, dtype=np.uint8)
            await bounded(self.ctrl.send(message, tag=message_tag(seq, slot)), deadline, f"{self!r} send {kind.name}")
            return
        sends = [self.ctrl.send(np.frombuffer(header, dtype=np.uint8), tag=message_tag(seq, slot)),
                 self.ctrl.send(np.frombuffer(body, dtype=np.uint8), tag=message_tag(seq, Slot(slot + 1)))]
        await gather_or_fail(sends, deadline, f"{self!r} send {kind.name}")

    async def recv_message(self, seq: int, slot: Slot, deadline: float | None) -> tuple[Kind, bytes | bytearray]:
        """(kind, body); the first wait is bounded by `deadline`, a separate body's by the lane timeout too."""
        raw = np.empty(CONTROL_BYTES, dtype=np.uint8)
        await bounded(self.ctrl.recv(raw, tag=message_tag(seq, slot)), deadline, f"{self!r} recv message")
        kind, body_len = unpack_header(raw[:HEADER.size], seq)
        if HEADER.size + body_len <= CONTROL_BYTES:
            return kind, raw[HEADER.size:HEADER.size + body_len].tobytes()
        body = bytearray(body_len)
        body_deadline = asyncio.get_running_loop().time() + self.timeout_s
        if deadline is not None:
            body_deadline = min(body_deadline, deadline)
        await bounded(self.ctrl.recv(body, tag=message_tag(seq, Slot(slot + 1))), body_deadline,
                      f"{self!r} recv {kind.name} body")
        return kind, body

    def send_payload(self, view: object, tag: int) -> Awaitable[Any]:
        return self.data_out.send(view, tag=tag, force_tag=True)

    def recv_payload(self, view: object, tag: int) -> Awaitable[Any]:
        return self.ctrl.recv(view, tag=tag, force_tag=True)

    def abort(self) -> None:
        """Closes both endpoints at once; UCX cancels what was posted through them."""
        if self.closed:
            return
        self.closed = self.broken = True
        for ep in {id(self.ctrl): self.ctrl, id(self.data_out): self.data_out}.values():
            try:
                ep.abort(period=ABORT_PERIOD_NS)
            except Exception:  # already closed by the peer's failure
                logger.debug("%r: abort raised", self, exc_info=True)


class LanePool:
    """Up to `max_lanes` lanes to one peer; a push or pull checks out one or more idle lanes."""

    def __init__(self, peer: str, connect: Callable[[float], Awaitable[Lane]], max_lanes: int) -> None:
        self.peer = peer
        self._connect = connect
        self._max_lanes = max_lanes
        self._idle: list[Lane] = []
        self._lanes: set[Lane] = set()  # idle and checked out
        self._num_open = 0  # lanes open or being opened
        self._changed = asyncio.Condition()
        self.cma_channel_failed = False  # connecting the peer's CMA channel failed once: OPEN_CMA goes over lanes

    @property
    def shares_memory(self) -> bool | None:
        """Whether payload to this peer goes over shared memory (None until a lane is open)."""
        for lane in self._lanes:
            return lane.data_out is not lane.ctrl
        return None

    @property
    def cma_channel(self) -> str:
        """The peer's CMA channel name ("" if it offers none, no lane is open, or connecting it failed)."""
        if self.cma_channel_failed:
            return ""
        for lane in self._lanes:
            return lane.cma_channel
        return ""

    @property
    def stream_port(self) -> int:
        """The peer's TCP stream port (0 if it offers none or no lane is open)."""
        for lane in self._lanes:
            return lane.stream_port
        return 0

    @property
    def peer_caps(self) -> int | None:
        """The peer's HELLO capability flags (None until a lane is open)."""
        for lane in self._lanes:
            return lane.peer_caps
        return None

    async def acquire(self, num_lanes: int, deadline: float) -> list[Lane]:
        """Between 1 and num_lanes lanes, opening new ones while under max_lanes; PeerUnavailable if none."""
        while True:
            lanes = [self._idle.pop() for _ in range(min(num_lanes, len(self._idle)))]
            num_new = min(num_lanes - len(lanes), self._max_lanes - self._num_open)
            if lanes or num_new > 0:
                break
            async with self._changed:
                await bounded(self._changed.wait(), deadline, f"waiting for a free lane to {self.peer}")
        if num_new > 0:
            self._num_open += num_new
            results = await asyncio.gather(*(self._connect(deadline) for _ in range(num_new)),
                                           return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            self._num_open -= len(errors)
            opened = [r for r in results if isinstance(r, Lane)]
            self._lanes.update(opened)
            lanes += opened
            if not lanes:
                raise PeerUnavailable(f"cannot connect to transfer peer {self.peer}: {errors[0]}") from errors[0]
            if errors:
                logger.warning("opened %d of %d lanes to %s: %s", num_new - len(errors), num_new, self.peer, errors[0])
        return lanes

    async def release(self, lanes: Sequence[Lane]) -> None:
        for lane in lanes:
            if lane.broken or lane.closed:
                lane.abort()
                self._lanes.discard(lane)
                self._num_open -= 1
            else:
                self._idle.append(lane)
        async with self._changed:
            self._changed.notify_all()

    def close(self) -> None:
        """Aborts every lane, the checked-out ones too (their users see KVTransferError)."""
        for lane in self._lanes:
            lane.abort()
        self._lanes.clear()
        self._idle.clear()
