"""One-sided UCX reads (RMA GET) for the UCX backend: memory handles, packed remote keys, and a batch of reads
posted at once. ucxx 0.52 exposes no RMA to Python, so this calls libucp (the library ucxx itself loaded) through
ctypes on the handles ucxx gives out (context, endpoint).

Why: a tagged UCX message costs a rendezvous round trip, a request and an event-loop completion each (about 50 us on
this host), so KV scattered over many blocks (no two adjacent) moved at one message per block. A batch of reads is
posted in one thread call, the pieces land straight in the registered buffer (no copy), and the batch waits on its
requests once: the cost per region is a few microseconds whatever the fragmentation.

    rma = Rma.get()                                     # None when libucp has no RMA here (then tagged sends)
    mapped = rma.map(memory)                            # at register_buffer: memh + packed rkey (bytes)
    batch = ReadBatch(lane.abort, loop)                 # what cancel/expiry abort
    await asyncio.to_thread(rma.read, ep_handle, rkey_bytes, [(local_ptr, remote_addr, nbytes), ...], local_memh,
                            batch)                      # posts every read, then waits for all (GIL released)
    rma.unmap(mapped)

The context is created by ucxx in MULTI thread mode, so these calls may run on any thread while ucxx's progress thread
progresses the worker. Only the side whose memory is written posts reads (the receiver of a push), after it checked the
token: no byte lands unchecked, and cancel/expiry stop the rest of a batch from being posted.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from pdserve.errors import KVTransferError

from .memory import Memory

logger = logging.getLogger(__name__)

UCS_OK = 0
UCS_INPROGRESS = 1
UCS_ERR_LAST = -100
MEMORY_TYPE_HOST, MEMORY_TYPE_CUDA = 0, 1
MEM_MAP_FIELD_ADDRESS, MEM_MAP_FIELD_LENGTH, MEM_MAP_FIELD_MEMORY_TYPE = 1 << 0, 1 << 1, 1 << 4
OP_ATTR_FIELD_MEMH = 1 << 8
FEATURE_RMA = 2
_PTR_SPACE = 1 << 64


class _MemMapParams(ctypes.Structure):
    _fields_ = [("field_mask", ctypes.c_uint64), ("address", ctypes.c_void_p), ("length", ctypes.c_size_t),
                ("flags", ctypes.c_uint), ("prot", ctypes.c_uint), ("memory_type", ctypes.c_int),
                ("exported_memh_buffer", ctypes.c_void_p)]


class _RequestParam(ctypes.Structure):  # ucp_request_param_t (UCX >= 1.10 layout)
    _fields_ = [("op_attr_mask", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("request", ctypes.c_void_p),
                ("cb", ctypes.c_void_p), ("datatype", ctypes.c_uint64), ("user_data", ctypes.c_void_p),
                ("reply_buffer", ctypes.c_void_p), ("memory_type", ctypes.c_int), ("recv_info", ctypes.c_void_p),
                ("memh", ctypes.c_void_p)]


def _status_of_ptr(ptr: int | None) -> int | None:
    """UCS_OK for NULL, the error for an error pointer, None for a request pointer."""
    if not ptr:
        return UCS_OK
    if ptr >= _PTR_SPACE + UCS_ERR_LAST:
        return ptr - _PTR_SPACE
    return None


@dataclasses.dataclass(slots=True)
class Mapped:
    """A registered buffer mapped with UCX: its memory handle and the remote key peers unpack to read it."""

    memory: Memory
    memh: int
    rkey: bytes


class ReadBatch:
    """One batch of reads a receiver posts under a token (an `Abortable` of tokens.py). abort() stops the posting and
    aborts the lane's endpoints, which cancels reads in flight, but only once the posting thread left libucp's
    posting calls (an endpoint must not be destroyed under a call that uses it)."""

    def __init__(self, abort_lane: Callable[[], None], loop: asyncio.AbstractEventLoop) -> None:
        self.stop = threading.Event()
        self._abort_lane = abort_lane
        self._loop = loop
        self._lock = threading.Lock()
        self._posting = True
        self._abort_pending = False

    def abort(self) -> None:
        """On the event loop: no more reads are posted; the lane is aborted now or when posting stops."""
        self.stop.set()
        with self._lock:
            if self._posting:
                self._abort_pending = True
                return
        self._abort_lane()

    def posted(self) -> None:
        """On the reading thread, after its last post."""
        with self._lock:
            self._posting = False
            pending = self._abort_pending
        if pending:
            self._loop.call_soon_threadsafe(self._abort_lane)


class Rma:
    """The process's libucp, bound to ucxx's context (one per process, like ucxx's own)."""

    _instance: Rma | None = None
    _lock = threading.Lock()

    def __init__(self, lib: ctypes.CDLL, context: int, ucs: ctypes.CDLL | None) -> None:
        self._lib = lib
        self._context = context
        self._ucs = ucs
        self.posted = 0  # reads posted since start (stats; read by the benchmark)
        lib.ucp_mem_map.argtypes = [ctypes.c_void_p, ctypes.POINTER(_MemMapParams), ctypes.POINTER(ctypes.c_void_p)]
        lib.ucp_mem_map.restype = ctypes.c_int
        lib.ucp_mem_unmap.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.ucp_mem_unmap.restype = ctypes.c_int
        lib.ucp_rkey_pack.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                      ctypes.POINTER(ctypes.c_size_t)]
        lib.ucp_rkey_pack.restype = ctypes.c_int
        lib.ucp_rkey_buffer_release.argtypes = [ctypes.c_void_p]
        lib.ucp_rkey_buffer_release.restype = None
        lib.ucp_ep_rkey_unpack.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
        lib.ucp_ep_rkey_unpack.restype = ctypes.c_int
        lib.ucp_rkey_destroy.argtypes = [ctypes.c_void_p]
        lib.ucp_rkey_destroy.restype = None
        lib.ucp_get_nbx.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64,
                                    ctypes.c_void_p, ctypes.POINTER(_RequestParam)]
        lib.ucp_get_nbx.restype = ctypes.c_void_p
        lib.ucp_request_check_status.argtypes = [ctypes.c_void_p]
        lib.ucp_request_check_status.restype = ctypes.c_int
        lib.ucp_request_free.argtypes = [ctypes.c_void_p]
        lib.ucp_request_free.restype = None
        if ucs is not None:
            ucs.ucs_status_string.argtypes = [ctypes.c_int]
            ucs.ucs_status_string.restype = ctypes.c_char_p

    @classmethod
    def get(cls, ucxx: Any) -> Rma | None:
        """The process's Rma once ucxx's context exists (call after ucxx.get_worker_address()); None when libucp
        cannot be found or the context lacks the RMA feature (callers then use tagged sends)."""
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls._load(ucxx)
            return cls._instance or None

    @classmethod
    def _load(cls, ucxx: Any) -> Rma | Any:
        try:
            import libucx

            libdir = os.path.join(os.path.dirname(libucx.__file__), "lib")
            lib = ctypes.CDLL(os.path.join(libdir, "libucp.so.0"))
            try:
                ucs = ctypes.CDLL(os.path.join(libdir, "libucs.so.0"))
            except OSError:
                ucs = None
            context = ucxx.core._get_ctx().context
            if not int(context.feature_flags) & FEATURE_RMA:
                logger.info("UCX context has no RMA feature: KV moves by tagged sends")
                return False
            return cls(lib, int(context.handle), ucs)
        except (ImportError, OSError, AttributeError) as exc:
            logger.info("UCX RMA unavailable (%s): KV moves by tagged sends", exc)
            return False

    def status_string(self, status: int) -> str:
        if self._ucs is None:
            return f"UCX status {status}"
        return self._ucs.ucs_status_string(status).decode(errors="replace")

    def map(self, memory: Memory) -> Mapped:
        """Maps a registered buffer (no copy; pins it only where a transport needs that, e.g. RDMA)."""
        params = _MemMapParams(field_mask=MEM_MAP_FIELD_ADDRESS | MEM_MAP_FIELD_LENGTH | MEM_MAP_FIELD_MEMORY_TYPE,
                               address=memory.ptr, length=memory.nbytes,
                               memory_type=MEMORY_TYPE_CUDA if memory.is_device else MEMORY_TYPE_HOST)
        memh = ctypes.c_void_p()
        status = self._lib.ucp_mem_map(self._context, ctypes.byref(params), ctypes.byref(memh))
        if status != UCS_OK:
            raise KVTransferError(f"ucp_mem_map of {memory.nbytes} bytes ({memory.device}): "
                                  f"{self.status_string(status)}")
        buf, size = ctypes.c_void_p(), ctypes.c_size_t()
        status = self._lib.ucp_rkey_pack(self._context, memh, ctypes.byref(buf), ctypes.byref(size))
        if status != UCS_OK:
            self._lib.ucp_mem_unmap(self._context, memh)
            raise KVTransferError(f"ucp_rkey_pack: {self.status_string(status)}")
        rkey = ctypes.string_at(buf, size.value)
        self._lib.ucp_rkey_buffer_release(buf)
        return Mapped(memory, int(memh.value or 0), rkey)

    def unmap(self, mapped: Mapped) -> None:
        status = self._lib.ucp_mem_unmap(self._context, mapped.memh)
        if status != UCS_OK:
            logger.warning("ucp_mem_unmap: %s", self.status_string(status))

    def read(self, ep_handle: int, rkey: bytes, pieces: Sequence[tuple[int, int, int]], local_memh: int | None,
             batch: ReadBatch) -> None:
        """Blocking (run it on a worker thread): reads every (local_ptr, remote_addr, nbytes) through `ep_handle`
        with the peer's packed `rkey`, then waits until all landed or failed. Stops posting once the batch is aborted
        and raises KVTransferError on any failure, after every posted read completed or was cancelled (the batch
        aborts the endpoint only once posting stopped), so nothing lands after this returns."""
        rkey_h = ctypes.c_void_p()
        requests: list[int] = []
        error: str | None = None
        try:
            status = self._lib.ucp_ep_rkey_unpack(ep_handle, rkey, ctypes.byref(rkey_h))
            if status != UCS_OK:
                raise KVTransferError(f"ucp_ep_rkey_unpack: {self.status_string(status)}")
            param = _RequestParam()
            if local_memh:
                param.op_attr_mask = OP_ATTR_FIELD_MEMH
                param.memh = local_memh
            for local_ptr, remote_addr, nbytes in pieces:
                if batch.stop.is_set():
                    error = "cancelled"
                    break
                ptr = self._lib.ucp_get_nbx(ep_handle, local_ptr, nbytes, remote_addr, rkey_h, ctypes.byref(param))
                self.posted += 1
                status = _status_of_ptr(ptr)
                if status is None:
                    requests.append(ptr)
                elif status != UCS_OK:
                    error = f"ucp_get_nbx: {self.status_string(status)}"
                    break
        finally:
            batch.posted()
        try:
            error = self._wait(requests) or error
        finally:
            if rkey_h.value:
                self._lib.ucp_rkey_destroy(rkey_h)
        if error is not None:
            raise KVTransferError(f"RMA read failed: {error}")

    def _wait(self, requests: list[int]) -> str | None:
        """Waits for every request (the progress thread completes them), frees them; the first error or None."""
        error = None
        pause = 20e-6
        pending = requests
        while pending:
            still = []
            for req in pending:
                status = self._lib.ucp_request_check_status(req)
                if status == UCS_INPROGRESS:
                    still.append(req)
                    continue
                if status != UCS_OK and error is None:
                    error = self.status_string(status)
                self._lib.ucp_request_free(req)
            pending = still
            if pending:
                time.sleep(pause)
                pause = min(pause * 2, 1e-3)
        return error
