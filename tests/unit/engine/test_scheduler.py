"""Scheduler decisions that the parity tests do not see."""

from __future__ import annotations

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import EngineConfig
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import Sequence, SequenceStatus


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
        sched.running.append(seq)
        seq.status = SequenceStatus.RUNNING
        seq.block_table = sched.bm.allocate(1)
        seq.num_computed_tokens = 10
        seq.token_ids.append(1)  # one generated token: each now needs exactly one new token
    step = {s.seq.req_id: s.num_new_tokens for s in sched.schedule()}
    # the long prompt is ahead of them in the running list, yet every decode is in the step
    assert step == {"d0": 1, "d1": 1, "d2": 1, "d3": 1, "long": 60}
