"""Scheduler decisions that the parity tests do not see."""

from __future__ import annotations

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import EngineConfig
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import Sequence, SequenceStatus


def _to_decoding(sched: Scheduler, seq: Sequence) -> Sequence:
    """`seq` (a 10-token prompt) running with its prompt computed and one generated token: it needs exactly
    one new token per step."""
    sched.running.append(seq)
    seq.status = SequenceStatus.RUNNING
    seq.block_table = sched.bm.allocate(1)
    seq.num_computed_tokens = 10
    seq.token_ids.append(1)
    return seq


def test_running_decodes_are_never_pushed_out_by_a_prefill_chunk():
    config = EngineConfig(max_num_batched_tokens=64, enable_prefix_caching=False)
    sched = Scheduler(config, BlockManager(256, 16, False), b"fp")
    long_prompt = Sequence("long", list(range(1000)), SamplingParams(max_tokens=4))
    sched.add(long_prompt)
    decodes = []
    for i in range(4):
        seq = Sequence(f"d{i}", list(range(10)), SamplingParams(max_tokens=4))
        sched.add(seq)
        decodes.append(seq)
    # step 1: the long prompt (first in line) takes the whole budget
    first = sched.schedule()
    assert [(s.seq.req_id, s.num_new_tokens) for s in first] == [("long", 64)]
    long_prompt.num_computed_tokens += 64
    # admit the short ones and bring them to their decode phase
    for seq in decodes:
        sched.waiting.remove(seq)
        _to_decoding(sched, seq)
    step = {s.seq.req_id: s.num_new_tokens for s in sched.schedule()}
    # the long prompt is ahead of them in the running list, yet every decode is in the step
    assert step == {"d0": 1, "d1": 1, "d2": 1, "d3": 1, "long": 60}


def _decoding(sched: Scheduler, req_id: str) -> Sequence:
    return _to_decoding(sched, Sequence(req_id, list(range(10)), SamplingParams(max_tokens=4)))


def _prompt_tokens(step) -> int:
    return sum(s.num_new_tokens for s in step if s.seq.req_id.startswith("p"))


def test_prompt_chunk_next_to_decodes_is_bounded_by_the_measured_prefill_speed():
    config = EngineConfig(max_num_batched_tokens=2048, prefill_chunk_ms=100.0, min_prefill_chunk=128,
                          enable_prefix_caching=False)
    sched = Scheduler(config, BlockManager(1024, 16, False), b"fp")
    for i in range(4):
        sched.add(Sequence(f"p{i}", list(range(1000)), SamplingParams(max_tokens=4)))
    # nothing decodes: the whole budget goes to prompts
    assert _prompt_tokens(sched.schedule()) == 2048
    for seq in list(sched.running):
        sched.preempt(seq)
    _decoding(sched, "d0")
    # decodes run, no prefill measured yet: the floor
    assert _prompt_tokens(sched.schedule()) == 128
    for seq in [s for s in sched.running if s.req_id.startswith("p")]:
        sched.preempt(seq)
    # a fast prefill (0.1 ms per token): 100 ms of it is 1000 tokens
    sched.chunk_bound.observe(500, 0.05)
    assert sched.chunk_bound.limit() == 1000
    assert _prompt_tokens(sched.schedule()) == 1000
    for seq in [s for s in sched.running if s.req_id.startswith("p")]:
        sched.preempt(seq)
    # a slow one (10 ms per token) moves the average down, but never under the floor
    for _ in range(20):
        sched.chunk_bound.observe(100, 1.0)
    assert sched.chunk_bound.limit() == 128
    assert _prompt_tokens(sched.schedule()) == 128


def test_prefill_chunk_ms_zero_gives_prompts_the_whole_budget_next_to_decodes():
    config = EngineConfig(max_num_batched_tokens=512, prefill_chunk_ms=0.0, enable_prefix_caching=False)
    sched = Scheduler(config, BlockManager(1024, 16, False), b"fp")
    _decoding(sched, "d0")
    sched.add(Sequence("p0", list(range(1000)), SamplingParams(max_tokens=4)))
    sched.chunk_bound.observe(100, 10.0)
    assert _prompt_tokens(sched.schedule()) == 511


def test_prefill_chunk_bound_rejects_bad_settings():
    import pytest

    with pytest.raises(ValueError, match="prefill_chunk_ms"):
        EngineConfig(prefill_chunk_ms=-1.0)
    with pytest.raises(ValueError, match="min_prefill_chunk"):
        EngineConfig(min_prefill_chunk=0)
