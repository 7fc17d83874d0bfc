"""transfer/memory.py: host and device buffers seen as flat bytes, without a copy (no GPU needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pdserve.errors import InvalidRequest
from pdserve.transfer.memory import DeviceBytes, memory_of


def test_numpy_and_cpu_tensor_share_memory() -> None:
    a = np.zeros((4, 4), dtype=np.float32)
    m = memory_of(a)
    m.slice(0, 4)[:] = 255
    assert (m.device, m.nbytes, m.ptr) == ("cpu", 64, a.ctypes.data) and a[0, 0] != 0
    t = torch.zeros(8, dtype=torch.bfloat16)
    mt = memory_of(t)
    mt.slice(2, 2)[:] = 0x3F
    assert mt.nbytes == 16 and t[1].item() != 0 and mt.ptr == t.data_ptr()


def test_strided_and_unknown_buffers_refused() -> None:
    with pytest.raises(InvalidRequest, match="contiguous"):
        memory_of(np.zeros((4, 4))[:, ::2])
    with pytest.raises(InvalidRequest, match="unsupported buffer type"):
        memory_of(b"bytes")


class FakeDeviceArray:
    """Only the CUDA array interface, as cupy or numba present it (the pointer is never dereferenced here)."""

    def __init__(self, ptr: int, shape: tuple[int, ...], typestr: str, strides=None) -> None:
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (ptr, False), "version": 3,
                                         "strides": strides}


def test_cuda_array_interface_sliced_without_touching_memory() -> None:
    m = memory_of(FakeDeviceArray(0x7000_0000, (16, 8), "<f2"))
    assert (m.device, m.nbytes, m.is_device, m.host_view) == ("cuda:0", 256, True, None)
    piece = m.slice(64, 32)
    assert isinstance(piece, DeviceBytes)
    cai = piece.__cuda_array_interface__
    assert cai["data"] == (0x7000_0000 + 64, False) and cai["shape"] == (32,) and cai["typestr"] == "|u1"
    with pytest.raises(InvalidRequest, match="C-contiguous"):
        memory_of(FakeDeviceArray(0x7000_0000, (16, 8), "<f2", strides=(2, 32)))


class FakeEvent:
    """A CUDA event's two methods; synchronize() blocks its thread for `delay_s`."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.synced = False

    def query(self) -> bool:
        return self.synced

    def synchronize(self) -> None:
        import time

        time.sleep(self.delay_s)
        self.synced = True


async def test_push_waits_for_the_kv_written_event() -> None:
    import asyncio

    from pdserve.errors import KVTransferTimeout
    from pdserve.transfer.memory import record_ready_event, wait_ready_event

    assert record_ready_event(torch.zeros(4)) is None  # host memory is written when the step returns
    await wait_ready_event(None, 1.0)
    event = FakeEvent(0.05)
    await wait_ready_event(event, 5.0)
    assert event.synced
    with pytest.raises(KVTransferTimeout):
        await wait_ready_event(FakeEvent(1.0), 0.05)
    await asyncio.sleep(0)
