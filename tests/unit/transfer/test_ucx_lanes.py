"""How many lanes a UCX push spreads over: large pushes only over shared memory, a few MiB up over the network."""

from __future__ import annotations

from types import SimpleNamespace

from pdserve.transfer.ucx import UCXTransport

MiB = 1 << 20


def test_lanes_per_push_depend_on_the_path() -> None:
    t = UCXTransport(num_lanes=4, lane_min_bytes=16 * MiB, network_lane_min_bytes=2 * MiB)
    shm, tcp, unknown = (SimpleNamespace(shares_memory=v) for v in (True, False, None))
    assert [t._num_lanes(shm, n * MiB) for n in (4, 16, 64)] == [1, 1, 4]
    assert [t._num_lanes(tcp, n * MiB) for n in (1, 4, 6, 64)] == [1, 2, 3, 4]
    assert t._num_lanes(unknown, 4 * MiB) == 1  # before the first lane is open: as if shared
