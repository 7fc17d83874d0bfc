#!/usr/bin/env python3
"""Where an engine step's time goes, for each built-in model: the torch profiler over real steps.

Two kinds of step, each measured over several steps of a live engine: a prefill step (the token
budget's worth of 256-token prompts, fresh) and a decode step (a batch of running sequences with
256-token prompts). The time is split into GEMMs (linear layers), attention, the KV write, the
other torch ops (norms, rotary, SiLU, embedding, metadata tensors), the sampler, the scheduler and
what is left: Python. Prints a table per backend (--backends), e.g. to see what the kernels save.

    python benchmarks/profile_engine.py --sizes tiny small --threads 2
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from pdserve.engine.builtin_model import ensure_builtin_model
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams

GEMM_OPS = ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm", "aten::linear", "aten::matmul")
ATTENTION = ("pdserve::paged_attention", "aten::scaled_dot_product_attention", "aten::index_select",
             "aten::_scaled_dot_product_flash_attention_for_cpu")
BACKENDS = {"kernels": {"attention_backend": "paged-cpu", "linear_backend": "onednn"},
            "reference": {"attention_backend": "reference", "linear_backend": "torch"}}


def categorise(prof, wall_s: float, phases: dict[str, float]) -> dict[str, float]:
    """Seconds per category, from the ops' self times (an op counts once, where it really ran)."""
    cats: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        name, t = evt.key, evt.self_cpu_time_total / 1e6
        if name.startswith("pdserve::phase"):
            continue
        if name in GEMM_OPS:
            cats["GEMM"] += t
        elif name in ATTENTION or "attention" in name:
            cats["attention"] += t
        elif name in ("aten::index_put_", "aten::index_copy_", "aten::_index_put_impl_"):
            cats["KV write"] += t
        else:
            cats["other torch ops"] += t
    ops_total = sum(cats.values())
    cats["python (engine, scheduler, sampler glue)"] = max(0.0, wall_s - ops_total)
    return cats


def profile_steps(engine: LLMEngine, num_steps: int) -> tuple[dict[str, float], float]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()  # inside: the profiler's own start-up is not a step's time
        for _ in range(num_steps):
            with record_function("pdserve::phase_step"):
                engine.step()
        wall = time.perf_counter() - t0
    return categorise(prof, wall, {}), wall / num_steps


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (length,), generator=g).tolist() for _ in range(n)]


def run(size: str, backend: str, args: argparse.Namespace) -> list[tuple[str, float, dict[str, float]]]:
    engine = LLMEngine(EngineConfig(model=str(ensure_builtin_model(size)), num_threads=args.threads,
                                    max_num_seqs=args.batch, enable_prefix_caching=False, **BACKENDS[backend]))
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=512, temperature=0.0, ignore_eos=True)
    engine.generate(prompts(2, 32, vocab, 99), SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    rows = []
    # prefill steps: fresh 256-token prompts, a budget's worth per step
    per_step = max(1, engine.config.max_num_batched_tokens // args.prompt_len)
    for i, p in enumerate(prompts(per_step * args.steps, args.prompt_len, vocab, 1)):
        engine.add_request(f"p{i}", p, SamplingParams(max_tokens=1, ignore_eos=True))
    cats, step_s = profile_steps(engine, args.steps)
    rows.append((f"prefill ({per_step}x{args.prompt_len} tok)", step_s, cats))
    while engine.has_unfinished():
        engine.step()
    # decode steps: a full batch of running sequences
    for i, p in enumerate(prompts(args.batch, args.prompt_len, vocab, 2)):
        engine.add_request(f"d{i}", p, params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.requests.values()):
        engine.step()
    cats, step_s = profile_steps(engine, args.steps)
    rows.append((f"decode (batch {args.batch})", step_s, cats))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--batch", type=int, default=60)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    print(f"{args.threads} thread(s); load average {os.getloadavg()[0]:.2f}")
    order = ["GEMM", "attention", "KV write", "other torch ops", "python (engine, scheduler, sampler glue)"]
    print(f"| model | backend | step | ms/step | " + " | ".join(order) + " |")
    print("|---|---|---|---:|" + "---:|" * len(order))
    for size in args.sizes:
        for backend in args.backends:
            for label, step_s, cats in run(size, backend, args):
                total = sum(cats.values())
                shares = " | ".join(f"{100 * cats.get(k, 0) / total:.0f}%" for k in order)
                print(f"| {size} | {backend} | {label} | {1e3 * step_s:.1f} | {shares} |", flush=True)


if __name__ == "__main__":
    main()
