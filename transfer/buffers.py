"""TransportCore: what every KVTransport backend holds the same way: its named registered buffers, its token
registry (tokens.py) and its counters. Backends subclass it and add how bytes move; nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from pdserve.errors import InvalidRequest, KVTransferError

from .base import TransferRejected, TransferStats
from .memory import Memory
from .regions import Region
from .tokens import Expectation, Exposure, TokenRegistry


class TransportCore:
    def __init__(self) -> None:
        self._stats = TransferStats()
        self._registry = TokenRegistry(self._stats)
        self._buffers: dict[str, Memory] = {}  # name -> registered memory

    @property
    def stats(self) -> TransferStats:
        return dataclasses.replace(self._stats)

    def unregister_buffer(self, name: str) -> None:
        self._buffers.pop(name, None)

    def _view(self, name: str) -> Memory:
        try:
            return self._buffers[name]
        except KeyError:
            raise InvalidRequest(f"no registered buffer named {name!r}") from None

    def expect(self, token: bytes, buffer: str, regions: Sequence[Region], timeout_s: float) -> Expectation:
        """Allows whoever presents `token` to write exactly these regions of `buffer` once, within timeout_s."""
        return self._registry.expect(token, buffer, self._view(buffer), regions, timeout_s)

    def expose(self, token: bytes, buffer: str, regions: Sequence[Region], timeout_s: float) -> Exposure:
        """Allows whoever presents `token` to read these regions of `buffer` (any number of times) within timeout_s."""
        return self._registry.expose(token, buffer, self._view(buffer), regions, timeout_s)

    def _count_error(self, exc: BaseException) -> None:
        if isinstance(exc, TransferRejected):
            self._stats.num_rejected += 1
        elif isinstance(exc, KVTransferError):
            self._stats.num_failures += 1
