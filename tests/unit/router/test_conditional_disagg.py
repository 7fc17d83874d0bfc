"""The conditional-disaggregation decision (router/dispatch.py `prefill_locally`)."""

from __future__ import annotations

import pytest

from pdserve.router.config import RouterConfig
from pdserve.router.dispatch import prefill_locally

CONFIG = RouterConfig(local_prefill_threshold=256, local_prefill_max_inflight=4, remote_prefill_max_queue_tokens=1024)


@pytest.mark.parametrize("tokens, inflight, queued, local", [
    (300, 0, None, False),   # long prompts always go to a prefill worker
    (300, 9, 5000, False),   # ... even when both sides are busy
    (100, 3, None, True),    # short prompt, decode not busy: local
    (100, 4, None, False),   # short prompt, decode busy: remote ...
    (100, 4, 1024, False),   # ... while the prefill queue is within its limit
    (100, 4, 1025, True),    # both busy: stay local rather than queue
])
def test_decision(tokens, inflight, queued, local):
    assert prefill_locally(CONFIG, tokens, inflight, queued) is local


@pytest.mark.parametrize("tokens, queued, decode_queued, local", [
    (3000, 5000, 0, True),      # saturated prefill pool: a long prompt overflows to an idle decode queue
    (3000, 5000, 4999, True),   # ... while decode's local queue is shorter
    (3000, 5000, 5000, False),  # ... not once it is as long
    (3000, 1024, 0, False),     # prefill queue within its limit: long prompts stay remote
    (100, 1025, 2000, True),    # a short prompt on a busy decode stays local past the limit regardless
])
def test_overflow_when_the_prefill_pool_is_saturated(tokens, queued, decode_queued, local):
    assert prefill_locally(CONFIG, tokens, 9, queued, decode_queued) is local


def test_limits_off():
    never_local = RouterConfig(local_prefill_threshold=0)
    assert not prefill_locally(never_local, 1, 0)
    assert not prefill_locally(never_local, 300, 9, 10**6, 0)  # threshold 0: no overflow either
    no_queue_limit = RouterConfig(local_prefill_threshold=256, local_prefill_max_inflight=0,
                                  remote_prefill_max_queue_tokens=0)
    assert not prefill_locally(no_queue_limit, 10, 0, 10**6)
    assert not prefill_locally(no_queue_limit, 1000, 9, 10**6, 0)  # no limit: no overflow either


def test_negative_limits_rejected():
    with pytest.raises(ValueError, match="remote_prefill_max_queue_tokens"):
        RouterConfig(remote_prefill_max_queue_tokens=-1)


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
