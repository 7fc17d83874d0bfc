"""Region arithmetic of the transfer layer (pure functions, no UCX)."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.errors import InvalidRequest
from pdserve.transfer.regions import IntervalSet, Piece, check_regions, has_overlap, pair_regions, \
    split_among_lanes


def test_pair_regions_merges_runs_contiguous_on_both_sides_and_splits_large_ones() -> None:
    src = [(0, 100), (100, 50), (1000, 10)]
    dst = [(500, 60), (560, 90), (0, 10)]
    assert pair_regions(src, dst, max_piece_bytes=1 << 20) == [Piece(0, 500, 150), Piece(1000, 0, 10)]
    assert pair_regions([(0, 10)], [(0, 10)], max_piece_bytes=4) == [Piece(0, 0, 4), Piece(4, 4, 4), Piece(8, 8, 2)]


def test_pair_regions_different_shapes_cover_every_byte_once() -> None:
    src = [(0, 1000)]
    dst = [(i * 300, 100) for i in range(10)]
    pieces = pair_regions(src, dst, max_piece_bytes=64)
    a = np.arange(1000, dtype=np.int64)
    out = np.full(3000, -1, dtype=np.int64)
    for p in pieces:
        out[p.dst_offset:p.dst_offset + p.nbytes] = a[p.src_offset:p.src_offset + p.nbytes]
    assert np.array_equal(np.concatenate([out[o:o + n] for o, n in dst]), a)


def test_pair_regions_rejects_size_mismatch() -> None:
    with pytest.raises(InvalidRequest):
        pair_regions([(0, 10)], [(0, 11)], max_piece_bytes=64)


def test_split_among_lanes_balances_bytes_and_keeps_order() -> None:
    pieces = [Piece(i * 10, i * 10, 10) for i in range(10)]
    groups = split_among_lanes(pieces, 3)
    assert sorted(p for g in groups for p in g) == pieces
    assert all(g == sorted(g) for g in groups) and max(map(len, groups)) - min(map(len, groups)) <= 1
    assert split_among_lanes(pieces[:1], 4) == [pieces[:1]]


def test_interval_set_covers_and_overlaps() -> None:
    s = IntervalSet([(0, 10), (20, 10)])
    s.add(10, 5)  # merges with the left neighbour
    assert s.covers(0, 15) and not s.covers(0, 16) and not s.covers(15, 5) and s.covers(22, 8)
    assert s.overlaps(14, 1) and not s.overlaps(15, 5) and s.overlaps(15, 6) and not s.overlaps(30, 100)
    s.add(15, 5)  # bridges both neighbours
    assert len(s) == 1 and s.covers(0, 30) and s.nbytes == 30


def test_check_regions_and_overlap() -> None:
    assert check_regions([[1, 2]], 3, "t") == [(1, 2)]
    for bad in ([(0, 0)], [(-1, 2)], [(2, 2)], []):
        with pytest.raises(InvalidRequest):
            check_regions(bad, 3, "t")
    assert has_overlap([(0, 10), (5, 1)]) and not has_overlap([(10, 5), (0, 10)])
