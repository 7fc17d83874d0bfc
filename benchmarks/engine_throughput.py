#!/usr/bin/env python3
"""Offline engine throughput and single-request latency, in process (no servers).

For each model size: 50 requests (256-token prompts, 64 output tokens, fixed seed) run as one
offline batch -> prompt and output tokens/s; then one request alone -> TTFT and time per output
token. float32; --threads sets the thread count (default 1). Prints a table and, with --json, writes the numbers.

    python benchmarks/engine_throughput.py --sizes tiny small
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pdserve.engine.builtin_model import ensure_builtin_model
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams

def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (length,), generator=g).tolist() for _ in range(n)]


def bench_size(size: str, args: argparse.Namespace) -> dict:
    model = ensure_builtin_model(size)
    engine = LLMEngine(EngineConfig(model=str(model), num_threads=args.threads, max_num_seqs=args.num_requests,
                                    dtype=args.dtype,
                                    max_num_batched_tokens=args.max_batched_tokens, enable_prefix_caching=False))
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    engine.generate(prompts(2, 32, vocab, 99), SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up

    batch = prompts(args.num_requests, args.prompt_len, vocab, args.seed)
    t0 = time.perf_counter()
    out = engine.generate(batch, params)
    elapsed = time.perf_counter() - t0
    n_out = sum(len(c.token_ids) for c in out)
    n_in = sum(len(p) for p in batch)

    # one request alone: TTFT, then per-token time
    ttfts, tpots = [], []
    for i, p in enumerate(prompts(args.single_runs, args.prompt_len, vocab, args.seed + 1)):
        engine.add_request(f"single-{i}", p, params)
        t_start = time.perf_counter()
        times = []
        while engine.has_unfinished():
            for o in engine.step():
                times.append(time.perf_counter())
        ttfts.append(times[0] - t_start)
        tpots.append((times[-1] - times[0]) / (len(times) - 1))
    tpot_ms = 1e3 * statistics.median(tpots)
    return {
        "size": size, "dtype": args.dtype, "embed_params_m": engine.model.embed.numel() / 1e6,
        "offline_output_tok_s": n_out / elapsed, "offline_total_tok_s": (n_in + n_out) / elapsed,
        "offline_prompt_tok_s_equiv": n_in / elapsed, "offline_seconds": elapsed,
        "single_ttft_ms": 1e3 * statistics.median(ttfts), "single_tpot_ms": tpot_ms,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    ap.add_argument("--num-requests", type=int, default=50)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-batched-tokens", type=int, default=512)
    ap.add_argument("--single-runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights and KV dtype (the issue's numbers are float32; bfloat16 uses AVX512-BF16 where present)")
    ap.add_argument("--json", default="", help="write results to this file")
    args = ap.parse_args()
    rows = [bench_size(s, args) for s in args.sizes]
    print(f"\nengine throughput: {args.num_requests} requests x {args.prompt_len} prompt + {args.output_len} output "
          f"tokens, {args.dtype}, {args.threads} thread(s)")
    print(f"{'model':<6} {'out tok/s':>10} {'total tok/s':>12} {'TTFT ms':>8} {'TPOT ms':>8}")
    for r in rows:
        print(f"{r['size']:<6} {r['offline_output_tok_s']:>10.0f} {r['offline_total_tok_s']:>12.0f} "
              f"{r['single_ttft_ms']:>8.1f} {r['single_tpot_ms']:>8.2f}")
    print("(vLLM side by side on the same machine: benchmarks/vs_vllm.py)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
