"""Engine connector: hashes checked once and cheaply, grants of prompt + headroom, growth and preemption
of prefilled sequences with the same tokens as a colocated run, blocks freed on every path."""

from __future__ import annotations

import pytest

from pdserve.engine.block_hash import chain_block_hashes
from pdserve.engine.config import EngineConfig
from pdserve.engine.connector import check_block_hashes
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import InvalidRequest, Overloaded

FP = b"fingerprint-0000"


def _all_free(engine: LLMEngine) -> bool:
    return engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64))


def test_block_hashes_are_checked_not_recomputed():
    prompt = list(range(70))
    hashes = chain_block_hashes(prompt, 16, FP)
    assert check_block_hashes(prompt, hashes, 16, FP) == hashes
    assert check_block_hashes(prompt[:15], [], 16, FP) == []
    with pytest.raises(InvalidRequest, match="full blocks"):
        check_block_hashes(prompt, hashes[:-1], 16, FP)
    with pytest.raises(InvalidRequest, match="disagree"):
        check_block_hashes(prompt, chain_block_hashes(prompt, 16, b"another-model-00"), 16, FP)
    changed_last = prompt[:48] + [999] + prompt[49:]
    with pytest.raises(InvalidRequest, match="disagree"):
        check_block_hashes(changed_last, hashes, 16, FP)


def test_reserve_grants_prompt_plus_bounded_headroom(engine):
    c = engine.connector
    grant = c.reserve("r1", num_prompt_tokens=40, max_tokens=500, headroom_tokens=24)
    assert grant.num_prompt_blocks == 3 and len(grant.block_ids) == 4  # 40 + 24 tokens = 4 blocks of 16
    assert list(grant.block_ids) == list(range(grant.block_ids[0], grant.block_ids[0] + 4))  # one run
    small = c.reserve("r2", num_prompt_tokens=40, max_tokens=2, headroom_tokens=24)
    assert len(small.block_ids) == 3  # max_tokens below the headroom: only what it can use
    with pytest.raises(Overloaded):
        c.reserve("r3", num_prompt_tokens=16 * 60, max_tokens=1, headroom_tokens=24)
    with pytest.raises(InvalidRequest):  # could never fit the whole pool: a bad request, not overload
        c.reserve("r4", num_prompt_tokens=16 * 40, max_tokens=16 * 30, headroom_tokens=24)
    c.free(grant.block_ids)
    c.free(small.block_ids)
    assert _all_free(engine)


def test_admit_failure_frees_the_grant(engine):
    c = engine.connector
    grant = c.reserve("dup", num_prompt_tokens=20, max_tokens=4, headroom_tokens=16)
    engine.add_request("dup", [1, 2, 3], SamplingParams(max_tokens=1))  # the id is taken
    with pytest.raises(InvalidRequest):
        c.admit_prefilled(grant, list(range(3, 23)), 5, SamplingParams(max_tokens=4), None, 0, [])
    engine.abort_request("dup")
    assert _all_free(engine)


def test_allocate_for_load_never_starves_the_request(engine):
    c = engine.connector
    assert c.allocate_for_load(4, num_prompt_tokens=16 * 61) == []  # 61 + 4 > 64 free
    blocks = c.allocate_for_load(4, num_prompt_tokens=16 * 10)
    assert len(blocks) == 4
    c.free(blocks)
    assert _all_free(engine)


def test_prefilled_sequences_grow_and_are_preempted_with_colocated_tokens(tiny_model_dir):
    """Two prefilled requests whose reservations hold prompt + 16 tokens must grow past them; the pool
    fits only one at full length, so one is preempted (recomputed here), and both match colocated."""
    prompts = [[(7 * i + 3 * j) % 2000 + 3 for j in range(40)] for i in range(2)]
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    reference = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64)).generate(prompts, params)

    src = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64))  # plays the prefill worker
    dst = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=10))  # 160 tokens < 2 x (40 + 60)
    for i, prompt in enumerate(prompts):
        seq = src.add_request(f"p{i}", prompt, SamplingParams(max_tokens=1, temperature=0.0), keep_blocks=True)
        while not seq.is_finished:
            src.step()
        grant = dst.connector.reserve(f"req{i}", len(prompt), params.max_tokens, headroom_tokens=16)
        assert len(grant.block_ids) == 4 and grant.num_prompt_blocks == 3  # 40 prompt + 16 headroom tokens
        dst.kv_cache.kv[list(grant.prompt_block_ids)] = src.kv_cache.kv[seq.block_table[:3]]  # "the push"
        dst.connector.admit_prefilled(grant, prompt, seq.token_ids[-1], params, None, 0,
                                      chain_block_hashes(prompt, 16, dst.fingerprint))
        src.connector.release(f"p{i}")
    tokens: dict[str, list[int]] = {"req0": [], "req1": []}
    for _ in range(2000):
        if not dst.has_unfinished():
            break
        for out in dst.step():
            tokens[out.req_id].extend(out.new_token_ids)
    assert dst.scheduler.num_preemptions >= 1
    for i, ref in enumerate(reference):
        assert [ref.token_ids[0]] + tokens[f"req{i}"] == ref.token_ids
    assert _all_free(dst) and _all_free(src) and not dst.requests
