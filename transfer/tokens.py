"""Receiver- and owner-side authorisation state shared by every transport backend: one-time tokens and what each
lets a peer write (Expectation) or read (Exposure). No I/O; a backend asks it before any byte may land or leave.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from collections.abc import Sequence
from typing import Protocol

from pdserve.errors import InvalidRequest, KVTransferError, KVTransferTimeout

from .base import MAX_TOKEN_BYTES, TransferRejected, TransferStats
from .memory import Memory
from .regions import IntervalSet, Region, check_regions, has_overlap, total_bytes

logger = logging.getLogger(__name__)


class Abortable(Protocol):
    """Whatever a backend has posted into or from a buffer (a UCX lane, a batch of reads): abort() cuts it off."""

    def abort(self) -> None: ...


def new_push_id() -> int:
    return secrets.randbits(63)


class Expectation:
    """Receiver side of a token: which regions of which buffer may be written, and how much has landed."""

    def __init__(self, token: bytes, buffer: str, memory: Memory, regions: list[Region], deadline: float) -> None:
        self.token = token
        self.buffer = buffer
        self.memory = memory  # the registered buffer
        self.regions = regions
        self.nbytes = total_bytes(regions)
        self.bytes_received = 0
        self.deadline = deadline  # event-loop clock
        self.allowed = IntervalSet(regions)
        self.claimed = IntervalSet()  # regions some OPEN already took
        self.push_ids: set[int] = set()
        self.lanes: set[Abortable] = set()  # lanes with receives posted into the buffer now
        self.error: KVTransferError | None = None
        self._finished = asyncio.Event()

    @property
    def done(self) -> bool:
        """All regions landed."""
        return self.error is None and self.bytes_received == self.nbytes

    @property
    def finished(self) -> bool:
        """Done, failed, timed out or cancelled."""
        return self._finished.is_set()

    async def wait(self) -> None:
        """Returns once every region landed; KVTransferTimeout past the deadline, KVTransferError if it failed."""
        await self._finished.wait()
        if self.error is not None:
            raise self.error

    def land(self, nbytes: int) -> None:
        self.bytes_received += nbytes
        if self.bytes_received == self.nbytes:
            self._finished.set()

    def fail(self, error: KVTransferError) -> None:
        """Marks failed and aborts the lanes still receiving into the buffer (no byte lands after this)."""
        if self.finished:
            return
        self.error = error
        self._finished.set()
        for lane in list(self.lanes):
            lane.abort()


class Exposure:
    """Owner side of a pull token: regions of a buffer anyone presenting the token may read until it expires."""

    def __init__(self, token: bytes, buffer: str, memory: Memory, regions: list[Region], deadline: float) -> None:
        self.token = token
        self.buffer = buffer
        self.memory = memory
        self.allowed = IntervalSet(regions)
        self.deadline = deadline
        self.num_reads = 0
        self.bytes_served = 0
        self.lanes: set[Abortable] = set()  # lanes sending from the buffer now
        self.closed = False


@dataclasses.dataclass(slots=True)
class Push:
    """One accepted OPEN: the regions it claimed and those some lane already wrote or is writing."""

    expectation: Expectation
    claim: IntervalSet
    written: IntervalSet


class TokenRegistry:
    """Live tokens of one agent; every check here runs before a receive is posted or a send starts."""

    def __init__(self, stats: TransferStats) -> None:
        self._stats = stats
        self._expectations: dict[bytes, Expectation] = {}
        self._exposures: dict[bytes, Exposure] = {}
        self._pushes: dict[int, Push] = {}  # push_id -> Push
        self._timers: dict[bytes, asyncio.TimerHandle] = {}  # token -> expiry

    def expect(self, token: bytes, buffer: str, memory: Memory, regions: Sequence[Region],
               timeout_s: float) -> Expectation:
        checked = self._check_new(token, memory, regions, "expect")
        if not memory.writeable:
            raise InvalidRequest(f"buffer {buffer!r} is read-only")
        loop = asyncio.get_running_loop()
        exp = Expectation(token, buffer, memory, checked, loop.time() + timeout_s)
        self._expectations[token] = exp
        self._timers[token] = loop.call_later(timeout_s, self.finish_expectation, token, KVTransferTimeout(
            f"expected {exp.nbytes} bytes into {buffer!r} within {timeout_s} s"))
        return exp

    def expose(self, token: bytes, buffer: str, memory: Memory, regions: Sequence[Region],
               timeout_s: float) -> Exposure:
        checked = self._check_new(token, memory, regions, "expose")
        loop = asyncio.get_running_loop()
        exposure = Exposure(token, buffer, memory, checked, loop.time() + timeout_s)
        self._exposures[token] = exposure
        self._timers[token] = loop.call_later(timeout_s, self.cancel, token)
        return exposure

    def cancel(self, token: bytes) -> None:
        if token in self._expectations:
            self.finish_expectation(token, KVTransferError("expectation cancelled"))
        exposure = self._exposures.pop(token, None)
        if exposure is not None:
            exposure.closed = True
            for lane in list(exposure.lanes):
                lane.abort()
        timer = self._timers.pop(token, None)
        if timer is not None:
            timer.cancel()

    def retire(self, token: bytes) -> None:
        """Forgets an exposure without cutting off reads already moving under it (their lanes stay, to be reused):
        any later read under `token` is rejected. Unknown or expired tokens are ignored."""
        exposure = self._exposures.pop(token, None)
        if exposure is not None:
            exposure.closed = True
        timer = self._timers.pop(token, None) if exposure is not None else None
        if timer is not None:
            timer.cancel()

    def close(self, reason: str) -> None:
        for token in list(self._expectations):
            self.finish_expectation(token, KVTransferError(reason))
        for token in list(self._exposures):
            self.cancel(token)

    def land(self, exp: Expectation, nbytes: int) -> None:
        """Counts `nbytes` more as landed under `exp`, and finishes it (the token forgotten) once all landed."""
        exp.land(nbytes)
        if exp.done:
            self.finish_expectation(exp.token, None)

    def finish_expectation(self, token: bytes, error: KVTransferError | None) -> None:
        """Forgets the token (any later use is rejected); fails the expectation when `error` is given."""
        exp = self._expectations.pop(token, None)
        timer = self._timers.pop(token, None)
        if timer is not None:
            timer.cancel()
        if exp is None:
            return
        for push_id in exp.push_ids:
            self._pushes.pop(push_id, None)
        if error is not None and not exp.finished:
            logger.info("expectation %s... failed after %d of %d bytes: %s", token[:4].hex(), exp.bytes_received,
                        exp.nbytes, error)
            exp.fail(error)
            self._stats.num_failures += 1

    def _check_new(self, token: bytes, memory: Memory, regions: Sequence[Region], what: str) -> list[Region]:
        if not isinstance(token, bytes) or not 8 <= len(token) <= MAX_TOKEN_BYTES:
            raise InvalidRequest(f"{what}: token must be 8..{MAX_TOKEN_BYTES} bytes")
        if token in self._expectations or token in self._exposures:
            raise InvalidRequest(f"{what}: token already in use")
        checked = check_regions(regions, memory.nbytes, what)
        if has_overlap(checked):
            raise InvalidRequest(f"{what}: regions overlap")
        return checked

    # ---- checks the server makes before posting receives / starting sends ----------------------
    def expectation_memory(self, token: bytes) -> Memory | None:
        """The buffer a live expectation of `token` writes into (None: unknown token); checks nothing."""
        exp = self._expectations.get(token)
        return None if exp is None else exp.memory

    def open_push(self, token: bytes, claim: list[Region], pieces: list[Region]) -> tuple[int, Push]:
        """Claims `claim` for a new push and marks this lane's `pieces` written; raises TransferRejected."""
        exp = self._expectations.get(token)
        if exp is None or exp.finished:
            raise TransferRejected("unknown, expired, cancelled or already used token")
        if has_overlap(claim):
            raise TransferRejected("destination regions overlap")
        for offset, nbytes in claim:
            if nbytes <= 0 or not exp.allowed.covers(offset, nbytes):
                raise TransferRejected(f"region ({offset}, {nbytes}) is outside the expected regions")
            if exp.claimed.overlaps(offset, nbytes):
                raise TransferRejected(f"region ({offset}, {nbytes}) was already written")
        push = Push(exp, IntervalSet(claim), IntervalSet())
        self._take_pieces(push, pieces)
        for offset, nbytes in claim:
            exp.claimed.add(offset, nbytes)
        push_id = new_push_id()
        self._pushes[push_id] = push
        exp.push_ids.add(push_id)
        return push_id, push

    def data_push(self, push_id: int, pieces: list[Region]) -> Push:
        """The push a DATA request continues, with `pieces` marked written; raises TransferRejected."""
        push = self._pushes.get(push_id)
        if push is None or push.expectation.finished:
            raise TransferRejected("unknown or finished push")
        self._take_pieces(push, pieces)
        return push

    @staticmethod
    def _take_pieces(push: Push, pieces: list[Region]) -> None:
        if has_overlap(pieces):
            raise TransferRejected("pieces overlap")
        for offset, nbytes in pieces:
            if nbytes <= 0 or not push.claim.covers(offset, nbytes) or push.written.overlaps(offset, nbytes):
                raise TransferRejected(f"piece ({offset}, {nbytes}) is outside the push or already written")
        for offset, nbytes in pieces:
            push.written.add(offset, nbytes)

    def exposure_for(self, token: bytes, pieces: list[Region]) -> Exposure:
        """The exposure allowing reads of all `pieces`; raises TransferRejected."""
        exposure = self._exposures.get(token)
        if exposure is None or exposure.closed:
            raise TransferRejected("unknown, expired or cancelled token")
        for offset, nbytes in pieces:
            if nbytes <= 0 or not exposure.allowed.covers(offset, nbytes):
                raise TransferRejected(f"region ({offset}, {nbytes}) is not exposed")
        return exposure
