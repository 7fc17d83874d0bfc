"""Direct libucp calls for the UCX backend, through ctypes on the handles ucxx gives out (context, worker, endpoint):
batches of tagged sends/receives, and one-sided reads (RMA GET) with memory handles and packed remote keys.

Why: through ucxx's Python API every message costs a request object, a future, a notifier-thread wake-up and an
event-loop callback (50-100 us per message on this host), so KV scattered over many blocks moved at that cost per
block. A batch posts every piece but the last with one ctypes call each (a few us) and the last through ucxx, whose
completion wakes the event loop; by then the others are (about always) complete, else a worker thread polls them
(the GIL is released in libucp and while it sleeps). The bytes still go straight from and into the registered
buffers (no copy) with the protocol UCX picks (rendezvous with CMA, TCP, cuda_ipc, RDMA).

    ucp = Ucp.get(ucxx)                                 # None when libucp cannot be loaded (then ucxx's API)
    batch = TagBatch(ucp)                               # on the event loop thread
    batch.send(ep_handle, ptr, nbytes, tag) / batch.recv(ptr, nbytes, tag)   # post, for every piece but the last
    await batch.finish(last_piece_through_ucxx, deadline)  # all done, or KVTransferError; batch.abort() cancels
    # reads (opt-in, see ucx.py: a sender killed mid-read aborts the reader over CMA)
    mapped = ucp.map(memory); ucp.unmap(mapped)         # memh + packed rkey (bytes) of a registered buffer
    batch = ReadBatch(lane.abort, loop)
    await asyncio.to_thread(ucp.read, ep_handle, rkey, [(local_ptr, remote_addr, nbytes), ...], local_memh, batch)

The context is created by ucxx in MULTI thread mode, so these calls may run on any thread while ucxx's progress thread
progresses the worker. Only the side whose memory is written posts receives or reads, after it checked the token: no
byte lands unchecked; abort() cancels what was posted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
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
FULL_TAG_MASK = (1 << 64) - 1
CANCEL_WAIT_S = 5.0  # how long wait() waits for cancelled requests to complete before leaving them to UCX
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


class Ucp:
    """The process's libucp, bound to ucxx's context and worker (one per process, like ucxx's own)."""

    _instance: Ucp | None = None
    _lock = threading.Lock()

    def __init__(self, lib: ctypes.CDLL, context: int, worker: int, rma: bool, ucs: ctypes.CDLL | None) -> None:
        self._lib = lib
        self._context = context
        self.worker = worker
        self.rma = rma  # the context has UCP_FEATURE_RMA (reads possible)
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
        lib.ucp_request_cancel.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.ucp_request_cancel.restype = None
        lib.ucp_tag_send_nbx.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64,
                                         ctypes.POINTER(_RequestParam)]
        lib.ucp_tag_send_nbx.restype = ctypes.c_void_p
        lib.ucp_tag_recv_nbx.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64,
                                         ctypes.c_uint64, ctypes.POINTER(_RequestParam)]
        lib.ucp_tag_recv_nbx.restype = ctypes.c_void_p
        self._param = _RequestParam()  # no callback: requests are polled, then freed
        if ucs is not None:
            ucs.ucs_status_string.argtypes = [ctypes.c_int]
            ucs.ucs_status_string.restype = ctypes.c_char_p

    @classmethod
    def get(cls, ucxx: Any) -> Ucp | None:
        """The process's Ucp once ucxx's context exists (call after ucxx.get_worker_address()); None when libucp
        cannot be loaded (callers then use ucxx's own API)."""
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls._load(ucxx)
            return cls._instance or None

    @classmethod
    def _load(cls, ucxx: Any) -> Ucp | Any:
        try:
            import libucx

            libdir = os.path.join(os.path.dirname(libucx.__file__), "lib")
            lib = ctypes.CDLL(os.path.join(libdir, "libucp.so.0"))
            try:
                ucs = ctypes.CDLL(os.path.join(libdir, "libucs.so.0"))
            except OSError:
                ucs = None
            ctx = ucxx.core._get_ctx()
            return cls(lib, int(ctx.context.handle), int(ctx.worker.handle),
                       bool(int(ctx.context.feature_flags) & FEATURE_RMA), ucs)
        except (ImportError, OSError, AttributeError) as exc:
            logger.warning("libucp cannot be called directly (%s): one ucxx request per KV piece", exc)
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


class TagBatch:
    """Tagged sends or receives of one operation posted straight into libucp (one ctypes call per piece, no Python
    future per message) and waited for together. Post on the event loop thread; wait() on a worker thread; abort()
    from the loop cancels whatever is still posted (receives are worker-wide in UCP: an endpoint abort does not
    reach them), and wait() returns only once every request completed or was cancelled, so nothing lands after it."""

    def __init__(self, ucp: Ucp) -> None:
        self._ucp = ucp
        self._lib = ucp._lib
        self._lock = threading.Lock()
        self._pending: list[int] = []  # request pointers not yet freed (guarded by _lock)
        self._error: str | None = None
        self.aborted = False
        self.num_posted = 0

    def _posted(self, ptr: int | None, what: str) -> None:
        self.num_posted += 1
        status = _status_of_ptr(ptr)
        if status is None:
            with self._lock:
                self._pending.append(ptr)  # type: ignore[arg-type]
        elif status != UCS_OK:
            raise KVTransferError(f"{what}: {self._ucp.status_string(status)}")

    def send(self, ep_handle: int, ptr: int, nbytes: int, tag: int) -> None:
        self._posted(self._lib.ucp_tag_send_nbx(ep_handle, ptr, nbytes, tag, ctypes.byref(self._ucp._param)),
                     "ucp_tag_send_nbx")

    def recv(self, ptr: int, nbytes: int, tag: int) -> None:
        self._posted(self._lib.ucp_tag_recv_nbx(self._ucp.worker, ptr, nbytes, tag, FULL_TAG_MASK,
                                                ctypes.byref(self._ucp._param)), "ucp_tag_recv_nbx")

    def abort(self) -> None:
        """Cancels every request still posted (an `Abortable` of tokens.py); wait() then raises."""
        with self._lock:
            self.aborted = True
            for req in self._pending:
                self._lib.ucp_request_cancel(self._ucp.worker, req)

    def poll(self) -> bool:
        """One non-blocking pass (event loop or thread): True once every request completed (raises KVTransferError
        like wait() if one failed)."""
        self._sweep()
        if self._pending:
            return False
        if self._error is not None or self.aborted:
            raise KVTransferError(f"UCX tagged batch failed: {self._error or 'aborted'}")
        return True

    def _sweep(self) -> None:
        """Frees the completed requests from the oldest on, stopping at the first still in flight (requests complete
        about in posting order, so a pass costs a call or two rather than one ctypes call per piece)."""
        with self._lock:
            done = 0
            for req in self._pending:
                status = self._lib.ucp_request_check_status(req)
                if status == UCS_INPROGRESS:
                    break
                if status != UCS_OK and self._error is None:
                    self._error = self._ucp.status_string(status)
                self._lib.ucp_request_free(req)
                done += 1
            del self._pending[:done]

    async def finish(self, last: Awaitable[Any], deadline: float) -> None:
        """Awaits `last` (the operation's final piece, posted through ucxx so that its completion wakes the event loop
        instead of a poll), then the batch: usually already complete by then, else waited for on a worker thread."""
        try:
            await last
        except BaseException:
            self.abort()  # then wait until the cancelled requests are done: nothing lands after this returns
            with contextlib.suppress(KVTransferError):
                await asyncio.to_thread(self.wait, 0.0)
            raise
        if not self.poll():
            await asyncio.to_thread(self.wait, max(0.001, deadline - asyncio.get_running_loop().time()))

    def wait(self, timeout_s: float) -> None:
        """Blocking: returns once every request completed; KVTransferError if any failed, was cancelled, or the
        timeout passed (then the rest are cancelled and waited for, up to CANCEL_WAIT_S more)."""
        deadline = time.monotonic() + timeout_s
        pause = 20e-6
        while True:
            before = len(self._pending)
            self._sweep()
            with self._lock:
                still = self._pending
                if len(still) < before:
                    pause = 20e-6
                if not still:
                    break
                if time.monotonic() > deadline:
                    if self._error is None:
                        self._error = "timed out"
                    if time.monotonic() > deadline + CANCEL_WAIT_S:
                        self._pending = []  # left to UCX (never freed) rather than freed while in use
                        logger.error("%d UCX requests did not finish after being cancelled", len(still))
                        break
                    for req in still:
                        self._lib.ucp_request_cancel(self._ucp.worker, req)
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
        if self._error is not None or self.aborted:
            raise KVTransferError(f"UCX tagged batch failed: {self._error or 'aborted'}")
