#!/usr/bin/env python3
"""The paged attention kernel against the reference (gather + SDPA) on one layer's worth of work.

Small-model shapes by default (12 heads, 4 KV heads, head_dim 64, 16-token blocks, float32): a batch
of decodes (one new row each) and of 4-row chunks over a long context, with blocks scattered at random
through the cache (as after churn) or in order, and with the KV small enough to stay in cache (what the
arithmetic costs without memory stalls). CPU time of this process (so other load on the machine
inflates it less than wall time would), one thread unless --threads.

    python benchmarks/attention_microbench.py --seqs 60 --ctx 300
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from pdserve.engine.attention import AttentionMetadata, PagedAttention, ReferenceAttention
from pdserve.engine.kernels import load_kernel
from pdserve.engine.kv_cache import PagedKVCache


def cpu_ms(fn, iters: int) -> float:
    for _ in range(2):
        fn()
    t = time.process_time()
    for _ in range(iters):
        fn()
    return (time.process_time() - t) / iters * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=60)
    ap.add_argument("--ctx", type=int, default=300)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    S, ctx, bs = args.seqs, args.ctx, args.block_size
    per_seq = (ctx + bs - 1) // bs
    g = torch.Generator().manual_seed(0)
    kernel = PagedAttention(load_kernel(), args.head_dim)
    reference = ReferenceAttention(args.heads, args.kv_heads, args.head_dim)
    print(f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f}; {S} sequences x {ctx} tokens, "
          f"{args.heads}/{args.kv_heads} heads x {args.head_dim}")
    print("| rows per sequence | blocks | KV MB | kernel ms | reference ms | reference / kernel |")
    print("|---:|---|---:|---:|---:|---:|")
    for q_len in (1, 4):
        for placement in ("random", "in order", "in cache"):
            num_blocks = 64 if placement == "in cache" else S * per_seq + 8
            cache = PagedKVCache(1, num_blocks, bs, args.kv_heads, args.head_dim, dtype=torch.float32)
            cache.kv.copy_(torch.randn(cache.kv.shape, generator=g))
            if placement == "random":
                ids = torch.randperm(num_blocks, generator=g)[: S * per_seq]
            elif placement == "in order":
                ids = torch.arange(S * per_seq)
            else:  # every sequence reads the same 64 blocks over and over: no memory stalls
                ids = torch.arange(S * per_seq) % 64
            tables = ids.to(torch.int32).view(S, per_seq).contiguous()
            cu = torch.arange(0, S * q_len + 1, q_len, dtype=torch.int32)
            meta = AttentionMetadata(torch.zeros(S * q_len, dtype=torch.long), cu,
                                     torch.full((S,), ctx, dtype=torch.int32), tables, bs)
            q = torch.randn(S * q_len, args.heads, args.head_dim, generator=g)
            k = torch.zeros(S * q_len, args.kv_heads, args.head_dim)
            fast = cpu_ms(lambda: kernel(q, k, k, 0, meta, cache), args.iters)
            slow = cpu_ms(lambda: reference(q, k, k, 0, meta, cache), max(2, args.iters // 3))
            mb = S * ctx * args.kv_heads * args.head_dim * 4 * 2 / 1e6
            print(f"| {q_len} | {placement} | {mb:.0f} | {fast:.2f} | {slow:.2f} | {slow / fast:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
