"""The SSD tier's file: runs of adjacent frames in one call each, bytes and checksums back as
written, a directory it cannot use turns the tier off instead of failing."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from pdserve.kvstore.node_pool import allocate_buffer
from pdserve.kvstore.node_ssd import SSDTier, runs_of

FRAME = 8192


def test_runs_group_adjacent_frames_in_order() -> None:
    views = [memoryview(bytes([i])) for i in range(5)]
    runs = runs_of([7, 2, 3, 9, 8], views)
    assert [(first, [bytes(v) for v in vs]) for first, vs in runs] == [
        (2, [b"\x01", b"\x02"]), (7, [b"\x00", b"\x04", b"\x03"])]


async def test_round_trip_through_the_file(tmp_path: Path) -> None:
    ssd = SSDTier(str(tmp_path / "ssd"), 16 * FRAME, "node@127.0.0.1:1")
    assert ssd.open() and ssd.is_on
    assert ssd.path.stat().st_size == 16 * FRAME and ":" not in ssd.path.name
    src = allocate_buffer(4 * FRAME, "host")  # page aligned, as a node's DRAM tier: O_DIRECT where allowed
    src[:] = np.random.default_rng(0).integers(0, 256, src.size, dtype=np.uint8)
    ssd.fix_frame_size(FRAME, src.ctypes.data)
    assert ssd.num_frames == 16
    direct = ssd.direct
    views = [memoryview(src)[i * FRAME:(i + 1) * FRAME] for i in range(4)]
    crcs = await ssd.write(runs_of([5, 6, 7, 12], views))
    assert crcs == [zlib.crc32(v) for v in views]
    dst = allocate_buffer(4 * FRAME, "host")
    back = [memoryview(dst)[i * FRAME:(i + 1) * FRAME] for i in range(4)]
    assert await ssd.read(runs_of([5, 6, 7, 12], back)) == crcs
    assert np.array_equal(src, dst)
    assert ssd.counters.bytes_written == ssd.counters.bytes_read == 4 * FRAME
    assert direct == ssd.direct  # (O_DIRECT works on ext4/xfs; tmpfs falls back to buffered I/O)
    ssd.close()


async def test_frames_longer_than_values_are_written_one_by_one(tmp_path: Path) -> None:
    ssd = SSDTier(str(tmp_path), 8 * 4096, "n")
    assert ssd.open()
    ssd.fix_frame_size(1000, 0)  # 1000 B values in 4096 B frames: buffered I/O
    assert not ssd.direct and ssd.frame_nbytes == 4096
    data = [memoryview(bytes([i]) * 1000) for i in range(3)]
    await ssd.write(runs_of([0, 1, 2], data))
    out = [memoryview(bytearray(1000)) for _ in range(3)]
    await ssd.read(runs_of([0, 1, 2], out))
    assert [bytes(o) for o in out] == [bytes(d) for d in data]


def test_unusable_directory_turns_the_tier_off(tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    ssd = SSDTier(str(blocker / "ssd"), 4 * FRAME, "n")
    assert not ssd.open() and not ssd.is_on
    assert "cannot reserve" in ssd.off_reason
    assert sum("SSD tier off" in r.message for r in caplog.records) == 1


def test_a_restart_discards_the_old_file(tmp_path: Path) -> None:
    first = SSDTier(str(tmp_path), 4 * FRAME, "n")
    assert first.open()
    first.path.write_bytes(b"x" * 100)
    os.close(first._fd)  # the node died (kill -9): its file stays behind
    again = SSDTier(str(tmp_path), 4 * FRAME, "n")
    assert again.open()
    assert again.path.read_bytes() == bytes(4 * FRAME)  # truncated and reserved anew: nothing old is readable
    again.close()
    assert not again.path.exists()  # a clean stop removes it
