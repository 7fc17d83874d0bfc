"""Wire format of the transfer backends' control messages: kinds, headers, bodies and (UCX) tags. No I/O here.

Every control message is a fixed 24-byte header and its body, sent as one UCX message when both fit
in CONTROL_BYTES (else as two), with a ucxx tag derived from the lane's request sequence number, so a
late or foreign message never matches a receive posted for another request. Payload tags come from a
random 64-bit base that the data's receiver picks per operation and reveals only to the authorised sender.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Sequence
from enum import IntEnum

import numpy as np

from pdserve.errors import KVTransferError

from .regions import Region

MAGIC = 0x50445846  # "PDXF"
HEADER = struct.Struct("<IHHQQ")  # magic, kind, reserved, seq, body_len -> 24 bytes
CONTROL_BYTES = 4096  # a control message up to this size (header + body) goes as one UCX message
MAX_BODY_BYTES = 64 << 20  # 64 MiB: about 4M regions in one request
# Low bits of a payload tag index the pieces of one operation; the high bits are random.
PIECE_INDEX_BITS = 24
MAX_PIECES_PER_OP = 1 << PIECE_INDEX_BITS


class Kind(IntEnum):
    # client -> server requests
    HELLO = 1  # body: host identity, worker address, capability flags (u64)[, pid, probe address, probe bytes]
    OPEN = 2  # body: token, claimed dst regions, this lane's pieces (dst_offset, nbytes)
    DATA = 3  # body: push_id, this lane's pieces (dst_offset, nbytes)
    PULL = 4  # body: token, pieces (src_offset, nbytes) in the owner's buffer
    OPEN_READ = 5  # body: token, claimed dst regions, sender's packed rkey, src base address, dst pieces, src pieces
    OPEN_CMA = 6  # body: token, claimed dst regions, dst pieces, src pieces (absolute addresses in the sender)
    OPEN_STREAM = 7  # (TCP stream) body: token, claimed dst regions, dst pieces; the pieces' bytes follow it
    # server -> client replies
    HELLO_REPLY = 10  # body: host identity, worker address, capability flags (u64)
    READY = 11  # body: push_id, payload tag base
    DONE = 12  # body: nbytes landed
    REJECT = 13  # body: reason (utf-8); nothing was written, the lane stays usable
    FAILED = 14  # body: reason (utf-8); the operation broke, the lane is dropped
    UNSUPPORTED = 15  # body: reason; OPEN_CMA cannot be served (e.g. device memory): nothing checked or written


class Slot(IntEnum):
    """Position of a message inside one request; tag = seq * 8 + slot (both ends compute it)."""

    REQUEST_HEADER = 0
    REQUEST_BODY = 1
    REPLY_HEADER = 2
    REPLY_BODY = 3
    FINAL_HEADER = 4
    FINAL_BODY = 5


CAP_RMA_READ = 1  # HELLO flag: this peer serves OPEN_READ (reads the sender's memory with UCX RMA GET)
CAP_CMA_SOURCE = 2  # HELLO flag (client): my memory may be read by CMA; my pid, a probe address and its bytes follow
CAP_CMA_READ = 4  # HELLO_REPLY flag: this lane serves OPEN_CMA (the probe read of the client's memory succeeded)
CAP_STREAM = 8  # HELLO_REPLY flag: OPEN_STREAM is served on a TCP port (u64, after the CMA channel name if any)


def message_tag(seq: int, slot: Slot) -> int:
    return (seq * 8 + slot) & 0x7FFF_FFFF_FFFF_FFFF


def new_payload_tag_base() -> int:
    """Random 64-bit base with the piece-index bits cleared."""
    return secrets.randbits(64) & ~(MAX_PIECES_PER_OP - 1) & 0xFFFF_FFFF_FFFF_FFFF


def unpack_header(raw: np.ndarray, expected_seq: int) -> tuple[Kind, int]:
    """(kind, body_len) of a received header; raises KVTransferError on garbage."""
    magic, kind, _, seq, body_len = HEADER.unpack(raw.tobytes())
    if magic != MAGIC or seq != expected_seq or body_len > MAX_BODY_BYTES:
        raise KVTransferError(f"bad header (magic {magic:#x}, seq {seq} != {expected_seq}, body {body_len} B)")
    try:
        return Kind(kind), body_len
    except ValueError:
        raise KVTransferError(f"unknown message kind {kind}") from None


class BodyWriter:
    """Builds a body from length-prefixed bytes, u64s and (offset, nbytes) int64 arrays."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def blob(self, data: bytes) -> BodyWriter:
        self._parts.append(struct.pack("<I", len(data)) + bytes(data))
        return self

    def u64(self, value: int) -> BodyWriter:
        self._parts.append(struct.pack("<Q", value))
        return self

    def regions(self, regions: Sequence[Region]) -> BodyWriter:
        self._parts.append(struct.pack("<I", len(regions)))
        self._parts.append(np.asarray(regions, dtype="<i8").reshape(-1, 2).tobytes())
        return self

    def build(self) -> bytes:
        return b"".join(self._parts)


class BodyReader:
    """Reads what BodyWriter wrote; any overrun or trailing garbage raises KVTransferError."""

    def __init__(self, body: bytes | bytearray) -> None:
        self._body = memoryview(body)
        self._pos = 0

    def _take(self, n: int) -> memoryview:
        if self._pos + n > len(self._body):
            raise KVTransferError("truncated message body")
        out = self._body[self._pos:self._pos + n]
        self._pos += n
        return out

    def blob(self) -> bytes:
        (n,) = struct.unpack("<I", self._take(4))
        return bytes(self._take(n))

    def u64(self) -> int:
        return struct.unpack("<Q", self._take(8))[0]

    def regions(self) -> list[Region]:
        (count,) = struct.unpack("<I", self._take(4))
        arr = np.frombuffer(self._take(count * 16), dtype="<i8").reshape(-1, 2)
        return [(int(o), int(n)) for o, n in arr]

    def remaining(self) -> int:
        return len(self._body) - self._pos

    def finish(self) -> None:
        if self._pos != len(self._body):
            raise KVTransferError("trailing bytes in message body")
