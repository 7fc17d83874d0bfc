"""GPU paths; each test skips cleanly where CUDA (or cupy) is absent, as on CI.

The engine on `--device cuda` must give the CPU engine's greedy tokens and logits (float32), and a
store node's `--memory device` pool lives in GPU memory.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")


@needs_cuda
def test_engine_on_cuda_matches_cpu(tiny_model_dir):
    prompts = [list(range(3, 3 + n)) for n in (7, 50, 130)] + [list(range(3, 53))]  # the last one hits the prefix cache
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    results = {}
    for device in ("cpu", "cuda"):
        engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), device=device, num_kv_blocks=64,
                                        max_num_batched_tokens=64))
        assert engine.kv_cache.kv.device.type == device
        engine.capture_logits = True
        outs = engine.generate(prompts, params)
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        results[device] = outs
    for cpu, gpu in zip(results["cpu"], results["cuda"]):
        assert gpu.token_ids == cpu.token_ids
        for a, b in zip(cpu.logits, gpu.logits):
            torch.testing.assert_close(b, a, atol=2e-3, rtol=1e-3)


def test_node_pool_in_device_memory():
    cupy = pytest.importorskip("cupy", reason="cupy (the gpu extra) is not installed")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except cupy.cuda.runtime.CUDARuntimeError:
        pytest.skip("no CUDA device")
    from pdserve.kvstore.node_pool import NodePool

    pool = NodePool(4 * 2**20, 0, "device")
    assert isinstance(pool.buffer, cupy.ndarray)
    assert pool.buffer.nbytes == 4 * 2**20
