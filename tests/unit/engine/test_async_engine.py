"""AsyncEngine: streaming from the engine thread, and coalescing when the consumer lags."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLMEngine(EngineConfig(model=str(tiny_model_dir), num_kv_blocks=64))


async def test_a_slow_consumer_gets_every_token_once_in_fewer_messages(llm):
    prompt = list(range(10, 40))
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=True)
    want = llm.generate([prompt], params)[0]
    engine = AsyncEngine(llm)
    engine.start()
    try:
        messages, tokens, logprobs = 0, [], []
        async for out in engine.generate_simple("slow", prompt, params):
            messages += 1
            tokens += out.new_token_ids
            logprobs += out.new_logprobs or []
            await asyncio.sleep(0.02)  # slower than a tiny-model step: outputs pile up
        assert tokens == want.token_ids
        assert logprobs == pytest.approx(want.logprobs)
        assert out.finished and out.num_output_tokens == 24
        assert messages < 24  # coalesced
    finally:
        await engine.stop()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
