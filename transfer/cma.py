"""Same-host reads of a peer process's memory by CMA (`process_vm_readv`), made by the receiver of a push itself
(the UCX backend's path between peers that share a kernel and pid namespace; ucx.py, ucx_server.py).

Why not UCX's own CMA: UCX runs shared memory + CMA only on endpoints without error handling, and there a failed
`process_vm_readv` (the sender was killed) aborts the reading process, so main's tagged path needs OPEN -> READY ->
payload -> DONE (the payload leaves only once the receiver is waiting for it). Called directly, the syscall just
fails (ESRCH, EFAULT, or a short count) and the push fails with KVTransferError. A push is then two control
messages (OPEN_CMA, DONE) and one syscall per 1,024 regions, whatever the fragmentation.

    cma = Cma.get()                      # None where the syscall is missing
    cma.probe(pid, addr, expected_bytes) -> bool   # at connect: may we read that peer at all (ptrace rules, pid ns)?
    cma.read(pid, [(local_ptr, remote_ptr, nbytes), ...], stop=None)   # blocking; KVTransferError on any failure

Only host memory: device memory moves through UCX (cuda_ipc / cuda_copy / RDMA).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from collections.abc import Sequence

import numpy as np

from pdserve.errors import KVTransferError

logger = logging.getLogger(__name__)

IOV_MAX = 1024  # iovecs per process_vm_readv call (Linux UIO_MAXIOV)
CHUNK_BYTES = 16 << 20  # a threaded read checks its stop flag between chunks of at most this many bytes


class CmaBatch:
    """A threaded read in progress under a token (an `Abortable` of tokens.py): abort() stops it between chunks."""

    def __init__(self) -> None:
        self.stop = threading.Event()

    def abort(self) -> None:
        self.stop.set()


class Cma:
    """process_vm_readv through ctypes (the GIL is released during the call)."""

    _instance: Cma | None = None
    _lock = threading.Lock()

    def __init__(self, fn: ctypes._CFuncPtr) -> None:  # type: ignore[name-defined]
        self._fn = fn
        self.calls = 0  # syscalls made since start (stats; read by tests and benchmarks)

    @classmethod
    def get(cls) -> Cma | None:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls._load()
            return cls._instance or None

    @classmethod
    def _load(cls) -> Cma | bool:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.process_vm_readv
        except (OSError, AttributeError) as exc:
            logger.info("process_vm_readv is not available (%s): same-host pushes go through UCX", exc)
            return False
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
        fn.restype = ctypes.c_ssize_t
        return cls(fn)

    def probe(self, pid: int, addr: int, expected: bytes) -> bool:
        """Whether `pid` can be read here: reads len(expected) bytes at its `addr` and compares."""
        if pid <= 0 or not expected:
            return False
        out = np.zeros(len(expected), dtype=np.uint8)
        try:
            self.read(pid, [(int(out.ctypes.data), addr, len(expected))])
        except KVTransferError as exc:
            logger.info("cannot read process %d by CMA (%s): pushes from it go through UCX", pid, exc)
            return False
        return out.tobytes() == expected

    def read(self, pid: int, reads: Sequence[tuple[int, int, int]], stop: threading.Event | None = None) -> None:
        """Copies every (local_ptr, remote_ptr, nbytes) from process `pid` into this process. Blocking; raises
        KVTransferError if the peer is gone, an address is bad, the read is not permitted, or `stop` was set."""
        if not reads:
            return
        table = np.asarray(reads, dtype=np.uint64).reshape(-1, 3)
        start = 0
        while start < len(table):
            if stop is not None and stop.is_set():
                raise KVTransferError("CMA read aborted")
            end, nbytes = start, 0  # one call: up to IOV_MAX regions and (with a stop flag) about CHUNK_BYTES
            while end < len(table) and end - start < IOV_MAX and (stop is None or nbytes < CHUNK_BYTES):
                nbytes += int(table[end, 2])
                end += 1
            self._read_all(pid, table[start:end])
            start = end

    def _read_all(self, pid: int, rows: np.ndarray) -> None:
        local = np.ascontiguousarray(rows[:, [0, 2]])  # struct iovec {void *base; size_t len} x n
        remote = np.ascontiguousarray(rows[:, [1, 2]])
        want = int(rows[:, 2].sum())
        done = 0
        while done < want:
            self.calls += 1
            got = self._fn(pid, local.ctypes.data, len(local), remote.ctypes.data, len(remote), 0)
            if got < 0:
                err = ctypes.get_errno()
                what = "peer process gone" if err == errno.ESRCH else os.strerror(err)
                raise KVTransferError(f"CMA read from process {pid} failed after {done} of {want} bytes: {what}")
            if got == 0:
                raise KVTransferError(f"CMA read from process {pid} stopped after {done} of {want} bytes")
            done += got
            if done < want:  # a short read: skip what landed and go on with the rest
                local, remote = _advance(local, got), _advance(remote, got)


def _advance(iov: np.ndarray, nbytes: int) -> np.ndarray:
    """The iovecs left after the first `nbytes` bytes were transferred."""
    ends = np.cumsum(iov[:, 1])
    first = int(np.searchsorted(ends, nbytes, side="right"))
    rest = iov[first:].copy()
    consumed_before = int(ends[first - 1]) if first else 0
    skip = nbytes - consumed_before
    rest[0, 0] += np.uint64(skip)
    rest[0, 1] -= np.uint64(skip)
    return rest
