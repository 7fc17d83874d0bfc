"""Registered memory of any kind, seen as flat bytes: host memory (numpy arrays, CPU torch tensors) and device memory
(CUDA torch tensors, cupy arrays, anything with the CUDA array interface). Never copies; owns no transfers.

A backend gets a `Memory` from `memory_of(buf)` and slices it per piece: host slices are numpy uint8 views, device
slices are small objects exposing `__cuda_array_interface__`, which UCX (ucxx) takes as device memory and moves with
cuda_copy / cuda_ipc / RDMA as it sees fit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from pdserve.errors import InvalidRequest


class DeviceBytes:
    """`nbytes` bytes of CUDA memory at `ptr`, as a 1-D uint8 array interface (keeps its owner alive)."""

    __slots__ = ("ptr", "nbytes", "device_id", "owner")

    def __init__(self, ptr: int, nbytes: int, device_id: int, owner: object) -> None:
        self.ptr = ptr
        self.nbytes = nbytes
        self.device_id = device_id
        self.owner = owner

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": (self.nbytes,), "typestr": "|u1", "data": (self.ptr, False), "version": 3, "strides": None}

    def __len__(self) -> int:
        return self.nbytes


@dataclasses.dataclass(frozen=True, slots=True)
class Memory:
    """One registered buffer: where it lives and how to hand a byte range of it to a backend."""

    device: str  # "cpu" or "cuda:N"
    ptr: int  # address of byte 0 (host virtual address, or CUDA device pointer)
    nbytes: int
    writeable: bool
    host_view: np.ndarray | None  # flat uint8 view (host memory only)
    owner: object  # the registered object, kept alive while registered

    @property
    def is_device(self) -> bool:
        return self.device != "cpu"

    def slice(self, offset: int, nbytes: int) -> np.ndarray | DeviceBytes:
        """Bytes [offset, offset + nbytes) as something ucxx sends from or receives into (no copy)."""
        if self.host_view is not None:
            return self.host_view[offset:offset + nbytes]
        return DeviceBytes(self.ptr + offset, nbytes, int(self.device.partition(":")[2] or 0), self.owner)


def _from_cuda_array_interface(buf: object, cai: dict[str, Any]) -> Memory:
    if cai.get("strides") is not None:
        shape, strides = cai["shape"], cai["strides"]
        itemsize = np.dtype(cai["typestr"]).itemsize
        expected = itemsize
        for dim, stride in zip(reversed(shape), reversed(strides)):
            if dim > 1 and stride != expected:
                raise InvalidRequest("device buffer must be C-contiguous")
            expected *= dim
    nbytes = int(np.prod(cai["shape"], dtype=np.int64)) * np.dtype(cai["typestr"]).itemsize
    ptr, read_only = cai["data"]
    device_id = 0
    device = getattr(buf, "device", None)
    if device is not None:  # cupy: Device object with .id; torch: torch.device with .index
        device_id = int(getattr(device, "id", None) or getattr(device, "index", None) or 0)
    return Memory(f"cuda:{device_id}", int(ptr), nbytes, not read_only, None, buf)


def memory_of(buf: object) -> Memory:
    """The bytes of a contiguous numpy array, torch tensor (CPU or CUDA) or CUDA-array-interface object; no copy.
    Raises InvalidRequest for anything else (strided, other devices, unknown types)."""
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise InvalidRequest("buffer must be C-contiguous")
        view = buf.reshape(-1).view(np.uint8)
        return Memory("cpu", int(view.ctypes.data), view.nbytes, bool(view.flags.writeable), view, buf)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        torch = None
    if torch is not None and isinstance(buf, torch.Tensor):
        if not buf.is_contiguous():
            raise InvalidRequest("tensor must be contiguous")
        flat = buf.detach().reshape(-1).view(torch.uint8)  # reinterprets any dtype (bf16 included) without a copy
        if buf.device.type == "cpu":
            view = flat.numpy()
            return Memory("cpu", int(view.ctypes.data), view.nbytes, True, view, buf)
        if buf.device.type == "cuda":
            return Memory(f"cuda:{buf.device.index or 0}", int(flat.data_ptr()), flat.numel(), True, None, buf)
        raise InvalidRequest(f"cannot register {buf.device} memory: only cpu and cuda tensors are supported")
    cai = getattr(buf, "__cuda_array_interface__", None)
    if cai is not None:
        return _from_cuda_array_interface(buf, cai)
    raise InvalidRequest(f"unsupported buffer type {type(buf).__name__}; use a numpy array, a torch tensor or an "
                         f"object with the CUDA array interface")


def record_ready_event(tensor: object) -> object | None:
    """For a CUDA torch tensor: a CUDA event recorded now on its device's current stream, complete once every kernel
    queued so far (the KV writes of the layer or chunk just computed) has run; None for host memory (already written).
    Called by whoever queues a push right after the compute that wrote the pushed bytes."""
    import torch

    if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(tensor.device))
    return event


async def wait_ready_event(event: object | None, timeout_s: float) -> None:
    """Returns once `event` (from record_ready_event) completed; KVTransferTimeout past timeout_s. No-op for None."""
    if event is None:
        return
    import asyncio

    from pdserve.errors import KVTransferTimeout

    if event.query():  # type: ignore[attr-defined]
        return
    try:  # synchronize() blocks its thread (not the loop) until the GPU passed the event
        await asyncio.wait_for(asyncio.to_thread(event.synchronize), timeout_s)  # type: ignore[attr-defined]
    except asyncio.TimeoutError:
        raise KVTransferTimeout(f"KV written on the GPU was not ready within {timeout_s} s") from None
