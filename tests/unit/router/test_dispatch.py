"""Dispatch bookkeeping (router/dispatch.py): request timing adds up over attempts."""

from __future__ import annotations

import pytest


def test_finish_timing_makes_the_parts_add_up():
    from pdserve.proto import pdserve_pb2 as pb
    from pdserve.router.dispatch import _added, finish_timing

    worker = pb.RequestTiming(kv_transfer_tail_s=0.01, decode_admission_s=0.02, decode_s=0.5)
    total = _added(pb.RequestTiming(reserve_s=0.003, prefill_compute_s=0.1), worker)
    total = _added(total, pb.RequestTiming(reserve_s=0.002))  # a retry's second Reserve adds, not replaces
    assert total.reserve_s == pytest.approx(0.005) and total.decode_s == pytest.approx(0.5)
    done = finish_timing(total, e2e_s=0.7)
    parts = [getattr(done, f.name) for f in pb.RequestTiming.DESCRIPTOR.fields]
    assert sum(parts) == pytest.approx(0.7) and done.router_s == pytest.approx(0.065)
    assert finish_timing(total, e2e_s=0.1).router_s == 0.0  # never negative
