"""Calibration of the simulator's workers on the real engine (`pdserve simulate --calibrate FILE`):
the step time of prefill chunks of several sizes and of decode batches of several sizes and contexts,
measured on an LLMEngine built exactly as a worker builds it (same EngineConfig flags, its threads),
(the fastest of a few repeats: the engine's own cost, without other processes' contention, which
the simulator models apart with --num-cores) fitted by least squares to StepModel (fixed + per decode sequence + per prefill token + per context
token), plus the KV bytes per token of its cache layout. Written as JSON (planner/simulator.py
Calibration)."""

from __future__ import annotations

import logging
import time

import numpy as np

from pdserve.engine.config import EngineConfig
from pdserve.engine.sampling_params import SamplingParams
from pdserve.planner.model import StepModel
from pdserve.planner.simulator import Calibration

logger = logging.getLogger(__name__)

CHUNKS = (16, 64, 128, 256, 512)
BATCHES = (1, 2, 4, 8, 16)
CONTEXTS = (32, 256)


def calibrate(engine_config: EngineConfig, repeats: int = 5, transfer_bytes_per_s: float = 1e9) -> tuple[
        Calibration, list[dict]]:
    """(the fitted calibration, every measured sample)."""
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.worker_runtime import resolve_model

    llm = LLMEngine(resolve_model(engine_config))
    vocab = llm.model_config.vocab_size
    greedy = dict(temperature=0.0, ignore_eos=True)
    samples: list[dict] = []
    n = 0

    def prompt(length: int) -> list[int]:
        nonlocal n
        n += 1
        return [(n * 7919 + i * 31) % (vocab - 10) + 5 for i in range(length)]  # distinct: no prefix hits

    def timed_step() -> float:
        t0 = time.perf_counter()
        llm.step()
        return time.perf_counter() - t0

    chunk_budget = llm.config.max_num_batched_tokens
    for chunk in [c for c in CHUNKS if c <= chunk_budget]:
        times = []
        for _ in range(repeats):
            llm.add_request(f"p{n}", prompt(chunk), SamplingParams(max_tokens=1, **greedy))
            times.append(timed_step())
            while llm.has_unfinished():
                llm.step()
        samples.append({"decode_seqs": 0, "prefill_tokens": chunk, "context_tokens": 0, "step_s": min(times)})
    for ctx in CONTEXTS:
        for batch in BATCHES:
            ids = [f"d{n}-{i}" for i in range(batch)]
            for rid in ids:
                llm.add_request(rid, prompt(ctx), SamplingParams(max_tokens=1024, **greedy))
            while any(llm.requests[r].num_computed_tokens < llm.requests[r].num_prompt_tokens for r in ids):
                llm.step()
            times = [timed_step() for _ in range(repeats)]
            samples.append({"decode_seqs": batch, "prefill_tokens": 0, "context_tokens": batch * ctx,
                            "step_s": min(times)})
            for rid in ids:
                llm.abort_request(rid)
            while llm.has_unfinished():
                llm.step()
    x = np.array([[1.0, s["decode_seqs"], s["prefill_tokens"], s["context_tokens"]] for s in samples])
    y = np.array([s["step_s"] for s in samples])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    coef = np.maximum(coef, [1e-5, 1e-6, 1e-7, 0.0])  # no negative costs from noise
    step = StepModel(*map(float, coef))
    layout = llm.kv_cache.layout()
    kv_bytes_per_token = int(llm.kv_cache.nbytes // (layout.num_blocks * layout.block_size))
    cal = Calibration(step=step, chunk_tokens=chunk_budget, max_num_seqs=llm.config.max_num_seqs,
                      num_kv_blocks=layout.num_blocks, block_size=layout.block_size,
                      kv_bytes_per_token=kv_bytes_per_token, transfer_bytes_per_s=transfer_bytes_per_s)
    for s in samples:
        s["fit_s"] = step.step_s(s["decode_seqs"], s["prefill_tokens"], s["context_tokens"])
    return cal, samples
