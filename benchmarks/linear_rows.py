#!/usr/bin/env python3
"""oneDNN-packed against plain `F.linear`, per row count, on the built-in models' layer shapes.

For each model (--sizes) and row count (--rows), times one pass over a layer's linears (qkv, o,
gate_up, down) plus the LM head, both ways, alternating, best of --rounds; prints the time of each
and plain / packed (below 1: plain is faster). This is the measurement behind engine/linear.py's
SMALL_WEIGHT / SMALL_ROWS: which products take the plain weight. With --engine-steps it also times
whole decode steps of a live engine (256-token prompts, --batches) with the row bound off (every product
packed) and on, alternating in one process.

    python benchmarks/linear_rows.py --sizes tiny small --threads 2
    python benchmarks/linear_rows.py --sizes tiny --engine-steps
"""

from __future__ import annotations

import argparse
import os
import time

import statistics

import torch
import torch.nn.functional as F

from pdserve.engine import linear
from pdserve.engine.builtin_model import SIZES, ensure_builtin_model


def layer_shapes(size: str) -> list[tuple[int, int]]:
    """(in_features, out_features) of one decoder layer's linears and the head."""
    s = SIZES[size]
    d = s.head_dim
    return [(s.hidden_size, (s.num_heads + 2 * s.num_kv_heads) * d), (s.num_heads * d, s.hidden_size),
            (s.hidden_size, 2 * s.intermediate_size), (s.intermediate_size, s.hidden_size),
            (s.hidden_size, s.vocab_size)]


def best_of(fn, reps: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def engine_steps(size: str, batches: list[int], threads: int, rounds: int) -> None:
    """Median decode-step time with SMALL_ROWS 0 (packed only) and its default, alternating."""
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling_params import SamplingParams

    bounds = (0, linear.SMALL_ROWS)
    engine = LLMEngine(EngineConfig(model=str(ensure_builtin_model(size)), num_threads=threads,
                                    enable_prefix_caching=False))
    vocab = engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    steps = 40 if size == "tiny" else 8
    print(f"| model | batch | packed only ms/step | rows <= {bounds[1]} plain ms/step | ratio |")
    print("|---|---:|---:|---:|---:|")
    for batch in batches:
        for i in range(batch):
            engine.add_request(f"b{batch}-{i}", torch.randint(10, vocab, (256,), generator=g).tolist(),
                               SamplingParams(max_tokens=(2 * rounds + 1) * 4 * steps, temperature=0.0,
                                              ignore_eos=True))
        while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.requests.values()):
            engine.step()
        samples: dict[int, list[float]] = {b: [] for b in bounds}
        for _ in range(2 * rounds):
            for bound in bounds:
                linear.SMALL_ROWS = bound
                for _ in range(3):
                    engine.step()
                t0 = time.perf_counter()
                for _ in range(steps):
                    engine.step()
                samples[bound].append((time.perf_counter() - t0) / steps * 1e3)
        linear.SMALL_ROWS = bounds[1]
        old, new = (statistics.median(samples[b]) for b in bounds)
        print(f"| {size} | {batch} | {old:.2f} | {new:.2f} | {new / old:.2f} |", flush=True)
        for req_id in list(engine.requests):
            engine.abort_request(req_id)
        while engine.has_unfinished():
            engine.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(SIZES))
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 128])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget-ms", type=float, default=150.0, help="time per (shape, rows, way) and round")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="weights and inputs (bfloat16: what the speculative drafts load)")
    ap.add_argument("--engine-steps", action="store_true", help="also time a live engine's decode steps")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8], help="with --engine-steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"{args.threads} thread(s), {args.dtype}; load average {os.getloadavg()[0]:.2f}")
    print("| model | rows | packed us | plain us | plain / packed |")
    print("|---|---:|---:|---:|---:|")
    for size in args.sizes:
        weights = [torch.randn(n, k).to(dtype) for k, n in layer_shapes(size)]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
        for rows in args.rows:
            t_packed = t_plain = 0.0
            for w, p in zip(weights, packed):
                x = torch.randn(rows, w.shape[1]).to(dtype)
                ways = (lambda: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""),
                        lambda: F.linear(x, w))
                one = max(best_of(ways[0], 3, 1), 1e-6)  # also the warm-up
                reps = max(3, int(args.budget_ms / 1e3 / one))
                times = [best_of(f, reps, args.rounds) for f in ways]
                t_packed += times[0]
                t_plain += times[1]
            print(f"| {size} | {rows} | {t_packed * 1e6:.0f} | {t_plain * 1e6:.0f} | {t_plain / t_packed:.2f} |",
                  flush=True)
    if args.engine_steps:
        for size in args.sizes:
            engine_steps(size, args.batches, args.threads, args.rounds)
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
