"""RoutingPolicy (router/policy.py): the conditional-disaggregation rule, decode and prefill choice,
queue counts, burst admission, per-worker speed. Workers are plain stand-ins (WorkerView)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from pdserve.engine.block_hash import chain_block_hashes
from pdserve.proto import pdserve_pb2 as pb

from pdserve.router.config import RouterConfig
from pdserve.router.policy import RoutingPolicy, prefill_locally

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


@dataclass
class FakeWorker:
    address: str
    role: int
    healthy: bool = True
    draining: bool = False
    inflight: int = 0
    queued_prompt_tokens: int = 0
    load_value: float = 0.0
    stats: pb.WorkerStats = field(default_factory=pb.WorkerStats)

    @property
    def worker_id(self) -> str:
        return self.address

    def load(self) -> float:
        return self.load_value


def hashes(n_tokens: int, seed: int = 0) -> list:
    return chain_block_hashes([(seed + i) % 100 for i in range(n_tokens)], 16, b"fp")


def test_route_short_local_long_remote_and_queue_counts():
    policy = RoutingPolicy(CONFIG, block_size=16)
    d, p = FakeWorker("d", pb.DECODE), FakeWorker("p", pb.PREFILL)
    short = policy.route([d, p], 100, hashes(100))
    assert short.local and short.decode is d and d.queued_prompt_tokens == 100
    long_ = policy.route([d, p], 300, hashes(300, 7))
    assert long_.prefill is p and p.queued_prompt_tokens == 300  # counted at once, before any Reserve
    policy.prefill_done(long_)
    policy.prefill_done(long_)  # idempotent
    policy.prefill_done(short)
    assert (d.queued_prompt_tokens, p.queued_prompt_tokens) == (0, 0)
    assert (policy.num_local_prefills, policy.num_remote_prefills) == (1, 1)


def test_route_decode_choice_fallbacks_and_exclusions():
    policy = RoutingPolicy(CONFIG, block_size=16)
    busy, idle, colo = FakeWorker("a", pb.DECODE, load_value=2), FakeWorker("b", pb.DECODE), \
        FakeWorker("c", pb.COLOCATED, load_value=1)
    p = FakeWorker("p", pb.PREFILL)
    r = policy.route([busy, idle, colo, p], 300, hashes(300))
    assert r.decode is idle and r.prefill is p and r.decode_fallbacks == [busy]  # colocated cannot take KV
    r = policy.route([busy, idle, colo, p], 300, hashes(300), excluded={"b"})
    assert r.decode is colo and r.local and r.reason == "colocated worker"
    assert policy.route([busy, p], 300, hashes(300), excluded={"a"}) is None
    assert policy.route([FakeWorker("d", pb.DECODE)], 300, hashes(300)).reason == "no healthy prefill worker"


def test_route_overflow_to_a_saturated_prefill_pools_decode():
    policy = RoutingPolicy(CONFIG, block_size=16)
    d, p = FakeWorker("d", pb.DECODE, inflight=9), FakeWorker("p", pb.PREFILL, queued_prompt_tokens=5000)
    r = policy.route([d, p], 3000, hashes(3000))
    assert r.local and "stays on decode" in r.reason and d.queued_prompt_tokens == 3000


def test_choose_prefill_prefers_cache_then_speed():
    policy = RoutingPolicy(CONFIG, block_size=16)
    p1, p2 = FakeWorker("p1", pb.PREFILL), FakeWorker("p2", pb.PREFILL)
    h = hashes(512)
    policy.record_prefill("p2", h)
    worker, choice = policy.choose_prefill([p1, p2], 512, h, stored_blocks=0)
    assert worker is p2 and choice.cached_tokens == 16 * 31
    for _ in range(20):  # p1 measured 10x faster than p2
        policy.observe_prefill("p1", 1000, 0.01)
        policy.observe_prefill("p2", 1000, 0.1)
    assert policy.s_per_token("p1") < policy.s_per_token("p2") / 5
    worker, _ = policy.choose_prefill([p1, p2], 512, hashes(512, 3), stored_blocks=0)
    assert worker is p1
    policy.forget_worker("p1")
    assert policy.s_per_token("p1") == policy.prefill_s_per_token


def test_a_burst_is_admitted_against_pending_tokens():
    policy = RoutingPolicy(CONFIG, block_size=16)
    p = FakeWorker("p", pb.PREFILL)
    alone = policy.predict_ttft_s([p], 1000)
    policy.pending_prefill_tokens += 9000  # nine requests admitted, none routed yet
    assert policy.predict_ttft_s([p], 1000) == pytest.approx(10 * alone)
    policy.pending_prefill_tokens -= 9000
    p2 = FakeWorker("p2", pb.PREFILL)
    policy.pending_prefill_tokens += 9000
    assert policy.predict_ttft_s([p, p2], 1000) == pytest.approx(5.5 * alone)  # shared by both
    assert policy.predict_ttft_s([], 1000) == 0.0


def test_a_draining_worker_gets_nothing_new():
    policy = RoutingPolicy(CONFIG, block_size=16)
    d1, d2 = FakeWorker("d1", pb.DECODE, draining=True), FakeWorker("d2", pb.DECODE, load_value=5)
    p1, p2 = FakeWorker("p1", pb.PREFILL, draining=True), FakeWorker("p2", pb.PREFILL, queued_prompt_tokens=900)
    r = policy.route([d1, d2, p1, p2], 300, hashes(300))
    assert r.decode is d2 and r.prefill is p2 and r.decode_fallbacks == []
    policy.prefill_done(r)
    r = policy.route([d1, p2], 300, hashes(300))  # the only decode worker is draining: it still serves
    assert r.decode is d1 and r.prefill is p2
