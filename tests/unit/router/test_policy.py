"""RoutingPolicy (router/policy.py): the conditional-disaggregation rule, decode and prefill choice,
queue counts, burst admission, per-worker speed. Workers are plain stand-ins (WorkerView)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from pdserve.engine.block_hash import chain_block_hashes
from pdserve.proto import pdserve_pb2 as pb

from pdserve.router.config import RouterConfig
from pdserve.engine.step_times import StepTimes
from pdserve.router.policy import RoutingPolicy, prefill_locally
from pdserve.router.worker_speed import WorkerSpeed

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
    speed: WorkerSpeed = field(default_factory=WorkerSpeed)

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


def measure(worker: FakeWorker, prefill_s_per_token: float = 0.0, decode_step_s: float = 0.0,
            polls: int = 5) -> None:
    """The worker reports `polls` polls' worth of steps at these speeds (WorkerStats' cumulative counters)."""
    counters = StepTimes()
    worker.speed.observe(counters.copy())
    for _ in range(polls):
        if prefill_s_per_token:
            counters.record(512, 0, 512 * prefill_s_per_token)
        if decode_step_s:
            for _ in range(10):
                counters.record(0, 4, decode_step_s)
        worker.speed.observe(counters.copy())


def test_choose_prefill_prefers_cache_then_speed():
    policy = RoutingPolicy(CONFIG, block_size=16)
    p1, p2 = FakeWorker("p1", pb.PREFILL), FakeWorker("p2", pb.PREFILL)
    h = hashes(512)
    policy.record_prefill("p2", h)
    worker, choice = policy.choose_prefill([p1, p2], 512, h, stored_blocks=0)
    assert worker is p2 and choice.cached_tokens == 16 * 31
    measure(p1, prefill_s_per_token=1e-5)  # p1 measured 10x faster than p2
    measure(p2, prefill_s_per_token=1e-4)
    assert policy.s_per_token(p1) == pytest.approx(1e-5) and policy.s_per_token(p2) == pytest.approx(1e-4)
    worker, _ = policy.choose_prefill([p1, p2], 512, hashes(512, 3), stored_blocks=0)
    assert worker is p1
    unmeasured = FakeWorker("p3", pb.PREFILL)
    assert policy.s_per_token(unmeasured) == policy.prefill_s_per_token  # the cluster-wide prior
    policy.observe_prefill(1000, 0.5)
    assert policy.s_per_token(unmeasured) > 1e-4


def test_a_worker_half_as_fast_gets_about_half_the_prefill_load():
    policy = RoutingPolicy(RouterConfig(local_prefill_threshold=256, remote_prefill_max_queue_tokens=0), block_size=16)
    fast, slow, d = FakeWorker("fast", pb.PREFILL), FakeWorker("slow", pb.PREFILL), FakeWorker("d", pb.DECODE,
                                                                                                inflight=9)
    measure(fast, prefill_s_per_token=1e-4)
    measure(slow, prefill_s_per_token=2e-4)
    tokens = {"fast": 0, "slow": 0}
    for i in range(60):  # prompts queue up faster than they finish
        r = policy.route([d, fast, slow], 400, hashes(400, i + 10))
        assert r.prefill is not None
        tokens[r.prefill.address] += 400
    assert 0.4 < tokens["slow"] / tokens["fast"] < 0.6
    assert 0.4 < slow.queued_prompt_tokens / fast.queued_prompt_tokens < 0.6


def test_a_worker_half_as_fast_gets_about_half_the_decode_sequences():
    policy = RoutingPolicy(CONFIG, block_size=16)
    fast, slow = FakeWorker("fast", pb.COLOCATED), FakeWorker("slow", pb.COLOCATED)
    measure(fast, decode_step_s=0.01)
    measure(slow, decode_step_s=0.02)
    for _ in range(60):
        w = policy.decode_candidates([fast, slow])[0]
        w.load_value += 1 / 64  # one more sequence on it
    ratio = slow.load_value / fast.load_value
    assert 0.4 < ratio < 0.6
    assert policy.decode_candidates([FakeWorker("a", pb.DECODE), FakeWorker("b", pb.DECODE)])[0].address == "a"


def test_worker_speed_from_step_counters():
    s = WorkerSpeed()
    assert s.prefill_s_per_token is None and s.decode_step_s(1) is None
    counters = StepTimes()
    s.observe(counters.copy())
    for batch in (1, 2, 4, 8, 16):  # one poll per batch size: a decode step costs 2 ms + 0.5 ms per sequence
        for _ in range(20):
            counters.record(0, batch, 2e-3 + 0.5e-3 * batch)
        s.observe(counters.copy())
    fixed, per_seq = s.decode_fit()
    assert fixed == pytest.approx(2e-3) and per_seq == pytest.approx(0.5e-3)
    # prefill steps carrying 8 decodes: their decode share (8 x 0.5 ms) is not charged to the prompt tokens
    for _ in range(5):
        counters.record(256, 8, 256 * 1e-4 + 8 * 0.5e-3)
        s.observe(counters.copy())
    assert s.prefill_s_per_token == pytest.approx(1e-4)
    s.observe(StepTimes())  # the worker restarted: counters back to zero, nothing learnt from the difference
    assert s.prefill_s_per_token == pytest.approx(1e-4)
    s.observe(StepTimes(num_prefill_steps=1, prefill_step_seconds=0.1, prefill_step_tokens=100))
    assert s.prefill_s_per_token > 1e-4  # learning resumed from the new baseline
    flat = WorkerSpeed()
    flat.observe(StepTimes())
    flat.observe(StepTimes(num_decode_steps=10, decode_step_seconds=0.05, decode_step_seqs=40))
    assert flat.decode_fit() == (pytest.approx(5e-3), 0.0)  # one batch size seen: flat at its mean


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


def test_decode_choice_weighs_the_prompts_queued_for_local_prefill():
    # after a planner made a prefill worker colocated: it has no sequences yet but every arrival went to it,
    # while the other holds a batch that is only decoding
    policy = RoutingPolicy(RouterConfig(), 16)
    busy = FakeWorker("a", pb.COLOCATED, load_value=0.3)
    queued = FakeWorker("b", pb.COLOCATED, load_value=0.05, queued_prompt_tokens=2500)
    queued.speed.prefill_s_per_token = 1e-3  # 2.5 s of prompts ahead of a new one
    assert policy.decode_candidates([busy, queued])[0] is busy
    queued.queued_prompt_tokens = 100  # 0.1 s: the emptier worker again
    assert policy.decode_candidates([busy, queued])[0] is queued
    r = policy.route([busy, queued], 300, hashes(300))
    assert r.local and r.decode is queued
