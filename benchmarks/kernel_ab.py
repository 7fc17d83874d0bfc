#!/usr/bin/env python3
"""A/B two or more versions of the CPU kernels' sources in one process, timed alternately.

Each version is a directory holding the sources engine/csrc/ holds (module.cpp, paged_attention.cpp,
fused_ops.cpp, kernels.h); each is built as its own extension module (cached under
$PDSERVE_KERNEL_CACHE or ~/.cache/pdserve/kernels, by source hash), checked against the first one's
output, and timed in rounds that alternate between the versions, so that load drifting on a shared
machine hits every version alike. CPU time of this process on one thread (--threads 1, the default),
wall time with more; the median of 7 rounds.

Cases (small-model shapes unless --shape tiny): decode of 60 sequences over a 300-token context with
the KV scattered through a cache too big for L3 ("decode dram") and with 64 blocks reused so the KV
stays in cache ("decode cache"); prefill of 2 fresh 256-token prompts ("prefill"); both in one call, as
a step that mixes prefill chunks and decodes ("mixed": how the work splits across --threads).

    cp -r engine/csrc /tmp/before        # then edit engine/csrc
    python benchmarks/kernel_ab.py /tmp/before engine/csrc --cases decode prefill
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from pathlib import Path

import torch
from torch.utils import cpp_extension

from pdserve.engine.kernels import CFLAGS, LDFLAGS, SOURCES, kernel_build_dir

SHAPES = {"small": (12, 4), "tiny": (4, 2)}  # (heads, KV heads), head_dim 64


def build(src: Path):
    files = [*SOURCES, "kernels.h"]
    h = hashlib.sha256(b"".join((src / n).read_bytes() for n in files)).hexdigest()[:12]
    name = f"pdserve_ab_{h}"
    out = kernel_build_dir().parent / "ab" / h
    out.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(name=name, sources=[str(src / n) for n in SOURCES], build_directory=str(out),
                              extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS))


def cases(which: list[str], heads: int, kv_heads: int):
    S, ctx, hd, bs = 60, 300, 64, 16
    g = torch.Generator().manual_seed(0)
    nblk = S * ((ctx + bs - 1) // bs) + 8
    k = torch.randn(nblk, bs, kv_heads, hd, generator=g)
    v = torch.randn(nblk, bs, kv_heads, hd, generator=g)
    mb = (ctx + bs - 1) // bs
    tables = torch.randperm(nblk, generator=g).to(torch.int32)[: S * mb].view(S, mb).contiguous()
    if "decode" in which:
        q = torch.randn(S, heads, hd, generator=g)
        cu = torch.arange(0, S + 1, dtype=torch.int32)
        cl = torch.full((S,), ctx, dtype=torch.int32)
        yield "decode dram", (q, k, v, tables, cu, cl)
        hot = (torch.arange(S * mb) % 64).to(torch.int32).view(S, mb).contiguous()
        yield "decode cache", (q, k[:64].clone(), v[:64].clone(), hot, cu, cl)
    if "prefill" in which:
        n, P = 2, 256
        q = torch.randn(n * P, heads, hd, generator=g)
        cu = torch.arange(0, n * P + 1, P, dtype=torch.int32)
        cl = torch.full((n,), P, dtype=torch.int32)
        yield "prefill 2x256", (q, k, v, tables[:n, : P // bs].contiguous(), cu, cl)
    if "mixed" in which:
        n, P = 2, 256
        q = torch.randn(n * P + S, heads, hd, generator=g)
        q_lens = [P] * n + [1] * S
        cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
        cl = torch.tensor([P] * n + [ctx] * S, dtype=torch.int32)
        extra = torch.randperm(nblk, generator=g).to(torch.int32)[: n * mb].view(n, mb)
        yield f"mixed 2x256+{S}", (q, k, v, torch.cat([extra, tables]).contiguous(), cu, cl)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+", type=Path, help="directories of kernel sources; the first is the baseline")
    ap.add_argument("--cases", nargs="+", choices=["decode", "prefill", "mixed"],
                    default=["decode", "prefill"])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=10, help="calls per round")
    ap.add_argument("--threads", type=int, default=1, help="more than 1: wall time instead of CPU time")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    mods = [build(s) for s in args.sources]
    heads, kv_heads = SHAPES[args.shape]
    scale = 64 ** -0.5
    what = "CPU" if args.threads == 1 else f"wall ({args.threads} threads)"
    print(f"{args.shape}: {heads} heads, {kv_heads} KV heads x 64; ms of {what} per call (median of {args.rounds} rounds)")
    for name, (q, k, v, t, cu, cl) in cases(args.cases, heads, kv_heads):
        outs = [torch.empty_like(q) for _ in mods]
        for m, o in zip(mods, outs):
            m.paged_attention(o, q, k, v, t, cu, cl, scale)
        errs = [(o - outs[0]).abs().max().item() for o in outs]
        times: list[list[float]] = [[] for _ in mods]
        for _ in range(args.rounds):
            for m, o, tt in zip(mods, outs, times):
                t0 = clock()
                for _ in range(args.iters):
                    m.paged_attention(o, q, k, v, t, cu, cl, scale)
                tt.append((clock() - t0) / args.iters * 1e3)
        meds = [statistics.median(tt) for tt in times]
        cells = [f"{s}: {m:.2f} ms ({m / meds[0]:.2f}x, max|diff| {e:.0e})" for s, m, e in zip(args.sources, meds, errs)]
        print(f"{name:14s} " + " | ".join(cells))


if __name__ == "__main__":
    main()
