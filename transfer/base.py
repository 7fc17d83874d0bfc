"""The seam between pdserve and whatever moves KV bytes: the `KVTransport` protocol, its handles, counters and
the error every backend raises for a refused request. No I/O; backends live beside it (`ucx.py`, `mooncake.py`).

Rules every backend keeps (tests/unit/transfer/test_conformance.py runs each against them):
- a receiver writes nothing for a request whose one-time token is unknown, expired, cancelled or used up, or
  whose regions leave what `expect` allowed; it answers TransferRejected before any byte lands;
- every wait has a deadline (KVTransferTimeout), a dead peer raises KVTransferError or PeerUnavailable;
- after `cancel(token)` returns, no byte lands under that token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from pdserve.errors import KVTransferError

from .regions import Region

MAX_TOKEN_BYTES = 256


class TransferRejected(KVTransferError):
    """The peer refused a request before any byte moved (unknown token, region outside what it allows, ...)."""


@dataclasses.dataclass(slots=True)
class TransferStats:
    """Counters since start; `seconds_*` are wall seconds inside push/pull calls and served operations."""

    bytes_sent: int = 0  # payload bytes that left this transport (pushes, served pulls)
    bytes_received: int = 0  # payload bytes that landed here (served pushes, pulls)
    num_pushes: int = 0  # completed push() calls
    num_pulls: int = 0  # completed pull() calls
    num_served: int = 0  # push/pull operations of peers this transport completed
    num_rejected: int = 0  # requests refused before any byte moved (bad token, region, ...), either side
    num_failures: int = 0  # operations that broke after starting, timeouts included, either side
    seconds_sending: float = 0.0
    seconds_receiving: float = 0.0


class ExpectationHandle(Protocol):
    """Receiver side of one token (what `expect` returns)."""

    nbytes: int  # bytes the token allows in all
    bytes_received: int

    @property
    def done(self) -> bool: ...

    async def wait(self) -> None:
        """Returns once every region landed; KVTransferTimeout past the deadline, KVTransferError if it failed."""


@runtime_checkable
class KVTransport(Protocol):
    """Moves bytes between registered buffers of two processes under one-time tokens; never chooses blocks.

    All methods run on the process's asyncio loop. `peer` is the other side's `address`.
    """

    name: str  # backend name, as in --kv-transport

    @property
    def address(self) -> str:
        """host:port peers reach this transport at (valid after start())."""

    @property
    def stats(self) -> TransferStats:
        """A copy of the counters."""

    async def start(self) -> None: ...

    async def close(self) -> None:
        """Fails every live expectation, drops exposures and connections."""

    def register_buffer(self, name: str, buf: object) -> None:
        """Makes a contiguous buffer addressable by name (no copy): numpy array, torch tensor (CPU or CUDA), or any
        object with the CUDA array interface. Raises InvalidRequest naming the device and backend when this backend
        cannot move that memory."""

    def unregister_buffer(self, name: str) -> None: ...

    def expect(self, token: bytes, buffer: str, regions: Sequence[Region], timeout_s: float) -> ExpectationHandle:
        """Allows whoever presents `token` to write exactly these regions of `buffer` once, within timeout_s."""

    def expose(self, token: bytes, buffer: str, regions: Sequence[Region], timeout_s: float) -> object:
        """Allows whoever presents `token` to read these regions of `buffer` (any number of times) within timeout_s."""

    async def cancel(self, token: bytes) -> None:
        """Drops the expectation or exposure of `token`; once this returns no byte lands under it (a backend whose
        writes cannot be cut off waits here for the ones in flight)."""

    def retire(self, token: bytes) -> None:
        """Ends an exposure once its reader is done: later pulls under `token` are rejected, reads already
        moving are not cut off (unlike `cancel`, which aborts them)."""

    async def push(self, peer: str, token: bytes, src_buffer: str, src_regions: Sequence[Region],
                   dst_regions: Sequence[Region], *, timeout_s: float | None = None) -> int:
        """Writes src regions of a local buffer into the peer's dst regions under `token`; returns bytes sent.
        TransferRejected (nothing written), KVTransferTimeout, KVTransferError, PeerUnavailable."""

    async def pull(self, peer: str, token: bytes, dst_buffer: str, dst_regions: Sequence[Region],
                   src_regions: Sequence[Region], *, timeout_s: float | None = None) -> int:
        """Reads the peer's exposed src regions (authorised by `token`) into local dst regions; returns bytes read."""
