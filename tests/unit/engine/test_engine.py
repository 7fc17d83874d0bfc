"""LLMEngine behaviour on the built-in tiny model: stop conditions, validation, seeded sampling,
no block leaks on finish / abort / keep_blocks release."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import InvalidModel, InvalidRequest


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64))


def _all_free(engine: LLMEngine) -> bool:
    return engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_max_tokens_and_stop_token(engine):
    out = engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"
    stop_at = out.token_ids[3]
    out2 = engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True,
                                                          stop_token_ids=[stop_at]))[0]
    assert out2.token_ids == out.token_ids[:out.token_ids.index(stop_at) + 1]
    assert out2.finish_reason == "stop"
    assert _all_free(engine)


def test_seeded_sampling_reproduces(engine):
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    a = engine.generate([[10, 11, 12]], p)[0].token_ids
    b = engine.generate([[10, 11, 12], [40, 41, 42, 43]], [p, SamplingParams(max_tokens=5, temperature=1.0)])[0]
    assert a == b.token_ids


def test_abort_frees_blocks(engine):
    engine.add_request("a", list(range(3, 60)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert not _all_free(engine)
    assert engine.abort_request("a")
    assert not engine.abort_request("a")
    assert _all_free(engine)


def test_keep_blocks_until_release(engine):
    engine.add_request("k", list(range(3, 40)), SamplingParams(max_tokens=1), keep_blocks=True)
    while engine.has_unfinished():
        engine.step()
    assert not _all_free(engine)
    engine.release("k")
    assert _all_free(engine)


@pytest.mark.parametrize("prompt, params, match", [
    ([], SamplingParams(), "empty"),
    ([999999], SamplingParams(), "vocabulary"),
    ([1] * 5000, SamplingParams(), "maximum context"),
    ([1] * 10, SamplingParams(max_tokens=4090), "max_tokens"),
])
def test_bad_requests_raise_typed_errors(engine, prompt, params, match):
    with pytest.raises(InvalidRequest, match=match):
        engine.add_request("bad", prompt, params)


def test_missing_or_unsupported_checkpoint(tmp_path, tiny_model_dir):
    with pytest.raises(InvalidModel, match="config.json"):
        LLMEngine(EngineConfig(model=str(tmp_path)))
    cfg = (tiny_model_dir / "config.json").read_text().replace('"silu"', '"gelu"')
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(InvalidModel, match="hidden_act"):
        LLMEngine(EngineConfig(model=str(tmp_path)))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InvalidModel, match="malformed"):
        LLMEngine(EngineConfig(model=str(tmp_path)))
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(InvalidModel, match="safetensors"):
        LLMEngine(EngineConfig(model=str(tmp_path)))


def test_bfloat16_runs_and_tracks_float32(tiny_model_dir):
    """--dtype bfloat16 (weights and KV cache): prefill, chunked prefill, prefix hits and batched
    decode all run, and the first step's logits stay close to float32's (same argmax on most rows)."""
    prompts = [list(range(3, 3 + n)) for n in (5, 40, 90)] + [list(range(3, 43))]  # the last one hits the prefix cache
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    first_logits = {}
    for dtype in ("float32", "bfloat16"):
        eng = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64, dtype=dtype,
                                     max_num_batched_tokens=64))
        assert eng.kv_cache.kv.dtype == getattr(torch, dtype)
        eng.capture_logits = True
        outs = eng.generate(prompts, params)
        assert all(len(o.token_ids) == 6 for o in outs)
        assert _all_free(eng)
        first_logits[dtype] = [o.logits[0] for o in outs]
    same_argmax = 0
    for f32, bf16 in zip(first_logits["float32"], first_logits["bfloat16"]):
        assert bf16.dtype == f32.dtype  # logits come back in float32 for the sampler
        assert (bf16 - f32).abs().max().item() < 0.05 * f32.abs().max().item()  # measured: ~0.7 %
        same_argmax += int(bf16.argmax().item() == f32.argmax().item())
    assert same_argmax >= 3


def test_step_times_count_prefill_and_decode_steps_apart(tiny_model_dir):
    """engine/step_times.py: what routers learn a worker's speed from (router/worker_speed.py)."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64, max_num_batched_tokens=32))
    engine.generate([list(range(5, 75)), list(range(100, 110))], SamplingParams(max_tokens=6, temperature=0.0,
                                                                             ignore_eos=True))
    t = engine.step_times
    assert t.prefill_step_tokens == 80 == engine.stats()["prefill_step_tokens"]  # every prompt token once
    assert t.num_prefill_steps >= 3  # 80 tokens at 32 a step
    assert t.prefill_step_seconds > 0 and t.decode_step_seconds > 0
    # each prompt's first token comes from its last prefill chunk: 5 more tokens each in pure decode steps
    # unless a decode rode along a prefill step
    assert t.decode_step_seqs + t.prefill_step_decode_seqs == 2 * 5
    assert t.num_decode_steps >= 5
