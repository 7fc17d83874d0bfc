"""A store node's SSD tier: one file in a configured directory cut into fixed-size frames, read and
written in runs of adjacent frames (one `preadv`/`pwritev` per run, O_DIRECT where the frame size
and the filesystem allow), in a worker thread so the event loop never waits on the disk. Moves
frames and checks their bytes; which value sits in which frame is node_pool.py's.

The file does not survive a restart: a starting node truncates it (the frame index lives in the
node's memory), so no block half-written by a node that died is ever read back; a node that stops
cleanly removes it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from .values import SSD_ALIGN, ssd_frame_nbytes

logger = logging.getLogger(__name__)

Run = tuple[int, list[memoryview]]  # (first frame, one buffer per frame, in frame order)


@dataclass(slots=True)
class SSDCounters:
    bytes_read: int = 0
    bytes_written: int = 0
    read_seconds: float = 0.0  # wall time of the reads in the I/O thread
    write_seconds: float = 0.0


class SSDTier:
    def __init__(self, directory: str, nbytes: int, name: str) -> None:
        self.path = Path(directory) / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.kvpool"
        self.nbytes = nbytes
        self.frame_nbytes = 0  # fixed with the slot size
        self.num_frames = 0
        self.direct = False  # O_DIRECT in use
        self.off_reason = ""  # why the tier is off ("" while on)
        self.counters = SSDCounters()
        self._fd = -1

    @property
    def is_on(self) -> bool:
        return self._fd >= 0 and not self.off_reason

    def open(self) -> bool:
        """Creates (truncating) the file and reserves its bytes; False, with one log line, when it cannot."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.posix_fallocate(self._fd, 0, self.nbytes)  # a full disk fails here, not in the middle of a write
        except OSError as exc:
            self.turn_off(f"cannot reserve {self.nbytes >> 20} MiB in {self.path.parent}: {exc.strerror or exc}")
            return False
        logger.info("SSD tier: %d MiB in %s", self.nbytes >> 20, self.path)
        return True

    def fix_frame_size(self, slot_nbytes: int, buffer_address: int) -> None:
        """Frames of `slot_nbytes` rounded up to SSD_ALIGN; O_DIRECT when the DRAM frames are aligned too."""
        self.frame_nbytes = ssd_frame_nbytes(slot_nbytes)
        self.num_frames = self.nbytes // self.frame_nbytes
        if not self.is_on or slot_nbytes % SSD_ALIGN or buffer_address % SSD_ALIGN or not hasattr(os, "O_DIRECT"):
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_DIRECT)
        except OSError as exc:  # tmpfs and some others refuse O_DIRECT: buffered I/O still works
            logger.info("SSD tier: no O_DIRECT on %s (%s); using buffered I/O", self.path, exc.strerror)
            return
        os.close(self._fd)
        self._fd = fd
        self.direct = True

    def turn_off(self, reason: str) -> None:
        if not self.off_reason:
            logger.error("SSD tier off: %s", reason)
        self.off_reason = reason
        self.close()

    def close(self) -> None:
        """The file goes too (a restart would discard it anyway; a partly reserved one frees the disk)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # its directory was never usable

    async def write(self, runs: list[Run]) -> list[int]:
        """Writes each run at its first frame; returns the CRC-32 of each buffer, runs in order."""
        return await asyncio.to_thread(self._io, runs, True)

    async def read(self, runs: list[Run]) -> list[int]:
        """Fills each run's buffers from its frames; returns the CRC-32 of what was read."""
        return await asyncio.to_thread(self._io, runs, False)

    def _io(self, runs: list[Run], writing: bool) -> list[int]:
        fd = self._fd
        if fd < 0:
            raise OSError(f"SSD tier is off: {self.off_reason}")
        started = time.perf_counter()
        crcs: list[int] = []
        nbytes = 0
        for first, views in runs:
            offset = first * self.frame_nbytes
            if self.direct or all(len(v) == self.frame_nbytes for v in views):
                done = (os.pwritev if writing else os.preadv)(fd, views, offset)
                want = sum(len(v) for v in views)
                if done != want:
                    raise OSError(f"short {'write' if writing else 'read'} at frame {first}: {done} of {want} B")
            else:  # frames longer than the values: one call per frame
                for i, view in enumerate(views):
                    pos = offset + i * self.frame_nbytes
                    done = os.pwrite(fd, view, pos) if writing else os.preadv(fd, [view], pos)
                    if done != len(view):
                        raise OSError(f"short {'write' if writing else 'read'} at frame {first + i}")
            crcs.extend(zlib.crc32(v) for v in views)
            nbytes += sum(len(v) for v in views)
        seconds = time.perf_counter() - started
        if writing:
            self.counters.bytes_written += nbytes
            self.counters.write_seconds += seconds
        else:
            self.counters.bytes_read += nbytes
            self.counters.read_seconds += seconds
        return crcs


def runs_of(frames: list[int], views: list[memoryview]) -> list[Run]:
    """Groups (frame, buffer) pairs into runs of adjacent frames, in frame order."""
    pairs = sorted(zip(frames, views), key=lambda p: p[0])
    runs: list[Run] = []
    for frame, view in pairs:
        if runs and runs[-1][0] + len(runs[-1][1]) == frame:
            runs[-1][1].append(view)
        else:
            runs.append((frame, [view]))
    return runs
