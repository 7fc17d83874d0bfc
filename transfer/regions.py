"""Byte-region arithmetic for the transfer layer: checks, pairing of src/dst region lists, interval sets.

A region is `(byte_offset, nbytes)` inside one registered buffer. Pure functions and one small
class; no I/O. Which regions to move is decided elsewhere (the transfer layer never chooses blocks).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from pdserve.errors import InvalidRequest

Region = tuple[int, int]  # (byte_offset, nbytes)


class Piece(NamedTuple):
    """A run of bytes contiguous in both the source and the destination buffer."""

    src_offset: int
    dst_offset: int
    nbytes: int


def check_regions(regions: Iterable[Sequence[int]], buffer_nbytes: int, what: str) -> list[Region]:
    """Regions as int tuples, each with nbytes > 0 and inside [0, buffer_nbytes); raises InvalidRequest."""
    out: list[Region] = []
    for region in regions:
        if len(region) != 2:
            raise InvalidRequest(f"{what}: a region is (byte_offset, nbytes), got {region!r}")
        offset, nbytes = int(region[0]), int(region[1])
        if offset < 0 or nbytes <= 0 or offset + nbytes > buffer_nbytes:
            raise InvalidRequest(f"{what}: region ({offset}, {nbytes}) outside buffer of {buffer_nbytes} bytes")
        out.append((offset, nbytes))
    if not out:
        raise InvalidRequest(f"{what}: no regions")
    return out


def total_bytes(regions: Iterable[Region]) -> int:
    return sum(n for _, n in regions)


def has_overlap(regions: Iterable[Region]) -> bool:
    """True when any two regions share a byte."""
    end = -1
    for offset, nbytes in sorted(regions):
        if offset < end:
            return True
        end = offset + nbytes
    return False


def pair_regions(src: Sequence[Region], dst: Sequence[Region], max_piece_bytes: int) -> list[Piece]:
    """Walk both lists in order; yield runs contiguous on both sides, merged when adjacent, split at max_piece_bytes.

    The lists may differ in shape (e.g. one 1 MiB source run into four 256 KiB destination blocks)
    but must hold the same number of bytes.
    """
    if total_bytes(src) != total_bytes(dst):
        raise InvalidRequest(f"source holds {total_bytes(src)} bytes but destination {total_bytes(dst)}")
    merged: list[list[int]] = []  # [src_offset, dst_offset, nbytes]
    i = j = 0
    src_used = dst_used = 0  # bytes consumed from src[i] / dst[j]
    while i < len(src):
        n = min(src[i][1] - src_used, dst[j][1] - dst_used)
        s, d = src[i][0] + src_used, dst[j][0] + dst_used
        last = merged[-1] if merged else None
        if last is not None and last[0] + last[2] == s and last[1] + last[2] == d:
            last[2] += n
        else:
            merged.append([s, d, n])
        src_used += n
        dst_used += n
        if src_used == src[i][1]:
            i, src_used = i + 1, 0
        if dst_used == dst[j][1]:
            j, dst_used = j + 1, 0
    pieces: list[Piece] = []
    for s, d, n in merged:
        for start in range(0, n, max_piece_bytes):
            pieces.append(Piece(s + start, d + start, min(max_piece_bytes, n - start)))
    return pieces


def split_among_lanes(pieces: Sequence[Piece], num_lanes: int) -> list[list[Piece]]:
    """Greedy balance by bytes; each returned list is non-empty and keeps the original piece order."""
    num_lanes = max(1, min(num_lanes, len(pieces)))
    loads = [0] * num_lanes
    assigned: list[list[tuple[int, Piece]]] = [[] for _ in range(num_lanes)]
    for index, piece in sorted(enumerate(pieces), key=lambda item: -item[1].nbytes):
        lane = loads.index(min(loads))
        loads[lane] += piece.nbytes
        assigned[lane].append((index, piece))
    return [[piece for _, piece in sorted(group)] for group in assigned if group]


class IntervalSet:
    """Disjoint, sorted, merged half-open byte intervals; O(log n) queries."""

    def __init__(self, regions: Iterable[Region] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.nbytes = 0
        for offset, nbytes in regions:
            self.add(offset, nbytes)

    def add(self, offset: int, nbytes: int) -> None:
        """Adds [offset, offset + nbytes); the caller ensures it does not overlap what is already here."""
        end = offset + nbytes
        k = bisect.bisect_right(self._starts, offset)
        self.nbytes += nbytes
        merge_left = k > 0 and self._ends[k - 1] == offset
        merge_right = k < len(self._starts) and self._starts[k] == end
        if merge_left and merge_right:
            self._ends[k - 1] = self._ends[k]
            del self._starts[k], self._ends[k]
        elif merge_left:
            self._ends[k - 1] = end
        elif merge_right:
            self._starts[k] = offset
        else:
            self._starts.insert(k, offset)
            self._ends.insert(k, end)

    def covers(self, offset: int, nbytes: int) -> bool:
        """True when every byte of the region is inside the set."""
        k = bisect.bisect_right(self._starts, offset) - 1
        return k >= 0 and self._ends[k] >= offset + nbytes

    def overlaps(self, offset: int, nbytes: int) -> bool:
        """True when any byte of the region is inside the set."""
        end = offset + nbytes
        k = bisect.bisect_left(self._ends, offset + 1)  # first interval ending after `offset`
        return k < len(self._starts) and self._starts[k] < end

    def __len__(self) -> int:
        return len(self._starts)
