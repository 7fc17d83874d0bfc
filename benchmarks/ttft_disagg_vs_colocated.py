#!/usr/bin/env python3
"""TTFT on an idle system: disaggregated (1 prefill + 1 decode) vs colocated (1 worker), and
layer-wise KV push (transfer overlaps compute) vs push-after-prefill.

Three clusters, started one after another (never two at once): `colocated`, `disagg` (prefill
pushes KV while it computes: `--kv-push chunk` by default, `--push layer` for a push per layer)
and `disagg-no-overlap` (`--kv-push request`: everything after the last chunk).
Prefix caching is off so every request computes its whole prompt; the router's
`--local-prefill-threshold 0` makes every disaggregated request use the prefill worker. One
request at a time; lengths are interleaved within a cluster and the cluster order rotates per
round, so slow drifts in machine load spread over all configurations. Per request: TTFT (send ->
first streamed token), time to the second token (TT2T; for disaggregated requests it includes
the transfer tail, since decode admits a request once all its KV has landed) and the KV bytes
decode received (its /metrics counter). Prints medians and ratios; with --doc, rewrites the
`## TTFT: disaggregated vs colocated` section of docs/benchmarks.md.

    python benchmarks/ttft_disagg_vs_colocated.py                      # ~4 min on 2 cores
    python benchmarks/ttft_disagg_vs_colocated.py --lengths 128 2048 --reps 2 --rounds 1 --no-doc
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import shlex
import statistics
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

from pdserve.client import Client  # noqa: E402
from bench_docs import replace_section  # noqa: E402
from pdserve.cluster import Cluster, ClusterSpec, start_cluster  # noqa: E402
from pdserve.engine.builtin_model import ensure_builtin_model  # noqa: E402

SECTION = "## TTFT: disaggregated vs colocated"
DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
CONFIG_NAMES = ("colocated", "disagg", "disagg-no-overlap")
FINDINGS = "### Findings"  # hand-written subsection, kept when the section is rewritten


def cluster_spec(name: str, model: str, worker_args: list[str], push: str = "chunk") -> ClusterSpec:
    disagg = name != "colocated"
    return ClusterSpec(
        model=model,
        num_prefill=1 if disagg else 0,
        num_decode=1 if disagg else 0,
        num_colocated=0 if disagg else 1,
        router_args=["--local-prefill-threshold", "0"],
        worker_args=["--no-enable-prefix-caching", *worker_args],
        prefill_args=["--kv-push", "request" if name == "disagg-no-overlap" else push],
        log_level="warning",
    )


def scrape_counter(metrics_url: str, name: str) -> float:
    """Sum of the samples of one Prometheus counter (`name` without `_total`)."""
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    pattern = re.compile(rf"^{re.escape(name)}_total(\{{[^}}]*\}})? (\S+)$")
    return sum(float(m.group(2)) for line in text.splitlines() if (m := pattern.match(line)))


async def one_request(client: Client, prompt: list[int], max_tokens: int, timeout_s: float) -> tuple[float, float]:
    """(TTFT, time to the second token) in seconds, from the send."""
    t0 = time.perf_counter()
    times = []
    async for msg in client.generate(prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True,
                                     skip_detokenize=True, timeout_s=timeout_s):
        if len(msg.token_ids):
            times.append(time.perf_counter())
    if len(times) < 2:
        raise RuntimeError(f"expected at least 2 token messages, got {len(times)}")
    return times[0] - t0, times[1] - t0


async def measure(cluster: Cluster, lengths: list[int], reps: int, warmup: int, max_tokens: int,
                  vocab_size: int, rng: random.Random, deadline: float, timeout_s: float) -> list[dict]:
    decode = next((p for p in cluster.procs if p.name.startswith("decode")), None)
    rows = []
    async with Client(cluster.router_address) as client:
        for _ in range(warmup):
            for length in lengths:
                await one_request(client, [rng.randrange(10, vocab_size) for _ in range(length)], max_tokens, timeout_s)
        for rep in range(reps):
            order = list(lengths)
            rng.shuffle(order)
            for length in order:
                if time.monotonic() > deadline:
                    print(f"  time limit reached; stopping this cluster at rep {rep}", file=sys.stderr)
                    return rows
                prompt = [rng.randrange(10, vocab_size) for _ in range(length)]
                before = scrape_counter(decode.metrics_url, "pdserve:kv_transfer_bytes_received") if decode else 0.0
                ttft_s, tt2t_s = await one_request(client, prompt, max_tokens, timeout_s)
                after = scrape_counter(decode.metrics_url, "pdserve:kv_transfer_bytes_received") if decode else 0.0
                rows.append({"length": length, "ttft_ms": 1e3 * ttft_s, "tt2t_ms": 1e3 * tt2t_s,
                             "kv_bytes": after - before})
    return rows


def median_of(rows: list[dict], config: str, length: int, key: str) -> float:
    values = [r[key] for r in rows if r["config"] == config and r["length"] == length]
    return statistics.median(values) if values else math.nan


def format_table(rows: list[dict], lengths: list[int]) -> str:
    header = ["prompt", "n", "colocated", "disagg", "no-overlap", "disagg/coloc", "no-ovl/ovl",
              "TT2T coloc", "TT2T disagg", "TT2T no-ovl", "KV MiB/req", "KV B/token"]
    out = [header]
    for length in lengths:
        n = sum(1 for r in rows if r["length"] == length and r["config"] == "disagg")
        ttft = {c: median_of(rows, c, length, "ttft_ms") for c in CONFIG_NAMES}
        tt2t = {c: median_of(rows, c, length, "tt2t_ms") for c in CONFIG_NAMES}
        kv = median_of(rows, "disagg", length, "kv_bytes")
        out.append([str(length), str(n), f"{ttft['colocated']:.1f}", f"{ttft['disagg']:.1f}",
                    f"{ttft['disagg-no-overlap']:.1f}", f"{ttft['disagg'] / ttft['colocated']:.3f}",
                    f"{ttft['disagg-no-overlap'] / ttft['disagg']:.3f}", f"{tt2t['colocated']:.1f}",
                    f"{tt2t['disagg']:.1f}", f"{tt2t['disagg-no-overlap']:.1f}", f"{kv / 2**20:.2f}",
                    f"{kv / length:.0f}"])
    widths = [max(len(row[i]) for row in out) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.rjust(w) for cell, w in zip(row, widths)) + " |" for row in out]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048], help="prompt lengths (tokens)")
    ap.add_argument("--reps", type=int, default=4, help="measured requests per length per cluster start")
    ap.add_argument("--rounds", type=int, default=3, help="times each configuration's cluster is started")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured requests per length after each start")
    ap.add_argument("--max-tokens", type=int, default=4, help="output tokens per request (>= 2 for TT2T)")
    ap.add_argument("--model-size", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--worker-args", default="", help="extra flags for every worker, e.g. '--num-threads 1'")
    ap.add_argument("--max-duration-s", type=float, default=600.0, help="bound on the whole run")
    ap.add_argument("--request-timeout-s", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--push", default="chunk", choices=["layer", "chunk"],
                    help="the `disagg` configuration's --kv-push (overlapped push granularity)")
    ap.add_argument("--json", help="write every measured request here")
    ap.add_argument("--doc", default=str(DOC_PATH), help="markdown file whose section is rewritten")
    ap.add_argument("--no-doc", action="store_true", help="print only")
    args = ap.parse_args()
    if args.max_tokens < 2 or args.reps < 1 or args.rounds < 1:
        ap.error("need --max-tokens >= 2, --reps >= 1, --rounds >= 1")

    load_start = os.getloadavg()
    started = datetime.now(timezone.utc)
    print(f"load average at start (1/5/15 min): {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}; "
          f"{os.cpu_count()} CPUs")
    model = ensure_builtin_model(args.model_size)
    vocab_size = min(json.loads((model / "config.json").read_text())["vocab_size"], 32000)
    deadline = time.monotonic() + args.max_duration_s
    rng = random.Random(args.seed)
    rows: list[dict] = []
    for round_index in range(args.rounds):
        shift = round_index % len(CONFIG_NAMES)
        for name in CONFIG_NAMES[shift:] + CONFIG_NAMES[:shift]:
            if time.monotonic() > deadline:
                break
            cluster = start_cluster(cluster_spec(name, str(model), shlex.split(args.worker_args), args.push),
                                    attempts=3)
            try:
                t = time.monotonic()
                got = asyncio.run(measure(cluster, args.lengths, args.reps, args.warmup, args.max_tokens,
                                          vocab_size, rng, deadline, args.request_timeout_s))
            finally:
                cluster.stop()
            for r in got:
                r.update(config=name, round=round_index)
            rows += got
            print(f"round {round_index} {name}: {len(got)} requests in {time.monotonic() - t:.1f} s, "
                  f"load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    load_end = os.getloadavg()

    table = format_table(rows, args.lengths)
    print(f"\nmedian TTFT / TT2T in ms ({args.model_size} model, {args.rounds} cluster starts x {args.reps} reps "
          f"per length and configuration)")
    print(table)
    print(f"load average at end (1/5/15 min): {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    if args.no_doc:
        return

    ratios = [median_of(rows, "disagg", n, "ttft_ms") / median_of(rows, "colocated", n, "ttft_ms")
              for n in args.lengths]
    no_overlap_ratios = [median_of(rows, "disagg-no-overlap", n, "ttft_ms") / median_of(rows, "colocated", n, "ttft_ms")
                         for n in args.lengths]
    no_overlap = [median_of(rows, "disagg-no-overlap", n, "tt2t_ms") - median_of(rows, "disagg", n, "tt2t_ms")
                  for n in args.lengths]
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    body = f"""
`benchmarks/ttft_disagg_vs_colocated.py` measures time to first token (TTFT) on an idle
system. It sends one request at a time with prefix caching off, so every prompt is computed in
full. It compares three clusters, started one after another: `colocated` (one worker does
prefill and decode), `disagg` (1 prefill + 1 decode worker with `--kv-push {args.push}`: each
{'prefill chunk' if args.push == 'chunk' else 'layer of each prefill chunk'}'s KV is pushed as soon as it is computed, overlapping the
rest of the prefill) and `disagg-no-overlap` (the same with `--kv-push request`: all KV is pushed
after the last chunk). The router runs with `--local-prefill-threshold 0`, so every
disaggregated request is prefilled remotely. Lengths are interleaved within each cluster, and
the cluster order rotates each round.

- Command: `{command}`
- Date: {started.strftime('%Y-%m-%d %H:%M UTC')}; machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), \
Python {platform.python_version()}; model: built-in `{args.model_size}`, float32, 1 torch thread per worker
- Load average (1/5/15 min): start {load_start[0]:.2f} / {load_start[1]:.2f} / {load_start[2]:.2f}, \
end {load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f}. Anything else running on the \
same 2 cores makes absolute times noisy. The ratios compare medians of variants measured in the same run.
- Samples: {args.rounds} cluster starts x {args.reps} requests per length and configuration \
({args.warmup} warm-up request per length after each start, not counted); {args.max_tokens} output tokens per request

Median milliseconds. TTFT is measured from send to the first streamed token. TT2T is time to the
second token. `disagg/coloc` and `no-ovl/ovl` are ratios of median TTFT. The KV columns show
the bytes decode received per request, from its `pdserve:kv_transfer_bytes_received` counter:

{table}

- disagg/colocated TTFT ratio per length: {', '.join(f'{n}: {r:.3f}' for n, r in zip(args.lengths, ratios))}
  (goal <= 1.05; {'met at every length' if all(r <= 1.05 for r in ratios) else 'missed at ' + ', '.join(str(n) for n, r in zip(args.lengths, ratios) if r > 1.05)}).
- disagg-no-overlap/colocated TTFT ratio per length: {', '.join(f'{n}: {r:.3f}' for n, r in zip(args.lengths, no_overlap_ratios))}.
- TT2T of no-overlap minus overlap per length (ms):
  {', '.join(f'{n}: {d:+.1f}' for n, d in zip(args.lengths, no_overlap))}.

How to read this. The prefill worker answers with the first token as soon as the last layer is
computed, while the last pushes finish in the background (`prefill/servicer.py`). So TTFT does
not wait for the transfer tail in either mode. A `no-ovl/ovl` TTFT ratio below 1 means that
pushing while computing slows the computation itself.
The transfer shows up in TT2T: decode admits the request only once all of its KV has landed.
With overlap, only the last chunk's (or layer's) push remains when the first token is returned. Without
overlap, the whole prompt's KV is still to move. TT2T for colocated is TTFT plus one decode
step. The KV per request is whole 16-token blocks x 4 layers x (K, V) x 2 KV heads x 64 dims x
4 bytes (float32) = 4096 bytes per token for the tiny model.
"""
    replace_section(Path(args.doc), SECTION, body, keep=FINDINGS)
    print(f"wrote section {SECTION!r} of {args.doc}")


if __name__ == "__main__":
    main()
