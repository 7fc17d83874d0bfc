#!/usr/bin/env python3
"""KV on the wire for multi-head latent attention (MLA, DeepSeek-V2) vs multi-head attention (MHA,
Llama) of the same hidden size, depth and head count, measured in one run.

Two random checkpoints are written with transformers' own classes (same hidden size, layers, heads
and MLP; the MLA model's MLPs are all dense, so only attention differs). For each model a colocated
cluster and a disaggregated one (1 prefill + 1 decode, `--kv-push chunk`, every request prefilled
remotely, prefix caching off) are started one after another and sent one request at a time.
Per request: KV bytes decode received (`pdserve:kv_transfer_bytes_received`), the prefill worker's
seconds spent sending (`pdserve:kv_transfer_seconds{direction="sent"}`), TTFT and time to the second
token (TT2T: decode admits a request once all its KV has landed). Prints medians and the MLA/MHA
ratios; with --doc, rewrites the `## MLA vs MHA: KV on the wire` section of docs/models.md.

    python benchmarks/mla_vs_mha.py                     # ~6 min on 2 shared cores
    python benchmarks/mla_vs_mha.py --lengths 256 --reps 2 --no-doc
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

from bench_docs import replace_section  # noqa: E402
from ttft_disagg_vs_colocated import cluster_spec, one_request, scrape_counter  # noqa: E402

from pdserve.client import Client  # noqa: E402
from pdserve.cluster import start_cluster  # noqa: E402
from pdserve.engine.builtin_model import ensure_builtin_model  # noqa: E402
from pdserve.engine.model_config import ModelConfig  # noqa: E402

SECTION = "## MLA vs MHA: KV on the wire"
DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "models.md"
MODELS = ("mha", "mla")
CONFIGS = ("colocated", "disagg")


def write_models(root: Path, hidden: int, layers: int, heads: int, kv_lora_rank: int, rope_dim: int,
                 vocab: int) -> dict[str, Path]:
    """The two checkpoints (transformers' classes, seeded), each with the built-in tokenizer beside it."""
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, LlamaConfig, LlamaForCausalLM

    head_dim = hidden // heads
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    configs = {
        "mha": (LlamaForCausalLM, LlamaConfig(head_dim=head_dim, **common)),
        # DeepSeek-V2-Lite's proportions: no q compression, nope dims = v dims = head_dim, all MLPs dense
        "mla": (DeepseekV2ForCausalLM, DeepseekV2Config(
            q_lora_rank=None, kv_lora_rank=kv_lora_rank, qk_rope_head_dim=rope_dim, qk_nope_head_dim=head_dim,
            v_head_dim=head_dim, first_k_dense_replace=layers, n_routed_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=hidden, **common)),
    }
    tokenizer_dir = ensure_builtin_model("tiny")
    out = {}
    for name, (model_cls, config) in configs.items():
        torch.manual_seed(0)
        model_cls(config).save_pretrained(root / name)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / f, root / name / f)
        out[name] = root / name
    return out


def scrape_labelled(metrics_url: str, name: str, label: str) -> float:
    """Sum of a counter's samples whose labels include `label` (e.g. 'direction="sent"')."""
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "_total{") and label in line)


async def measure(cluster, lengths: list[int], reps: int, vocab: int, rng: random.Random, timeout_s: float
                  ) -> list[dict]:
    decode = next((p for p in cluster.procs if p.name.startswith("decode")), None)
    prefill = next((p for p in cluster.procs if p.name.startswith("prefill")), None)

    def counters() -> tuple[float, float]:
        if decode is None:
            return 0.0, 0.0
        return (scrape_counter(decode.metrics_url, "pdserve:kv_transfer_bytes_received"),
                scrape_labelled(prefill.metrics_url, "pdserve:kv_transfer_seconds", 'direction="sent"'))

    rows = []
    async with Client(cluster.router_address) as client:
        for length in lengths:  # warm-up, not counted
            await one_request(client, [rng.randrange(10, vocab) for _ in range(length)], 2, timeout_s)
        for _ in range(reps):
            order = list(lengths)
            rng.shuffle(order)
            for length in order:
                prompt = [rng.randrange(10, vocab) for _ in range(length)]
                bytes0, send0 = counters()
                ttft_s, tt2t_s = await one_request(client, prompt, 2, timeout_s)
                bytes1, send1 = counters()
                rows.append({"length": length, "ttft_ms": 1e3 * ttft_s, "tt2t_ms": 1e3 * tt2t_s,
                             "kv_bytes": bytes1 - bytes0, "send_ms": 1e3 * (send1 - send0)})
    return rows


def med(rows: list[dict], model: str, config: str, length: int, key: str) -> float:
    values = [r[key] for r in rows if r["model"] == model and r["config"] == config and r["length"] == length]
    return statistics.median(values) if values else float("nan")


def table(rows: list[dict], lengths: list[int]) -> str:
    header = ["prompt", "model", "KV B/token", "KV MiB/req", "send ms/req", "TTFT coloc", "TTFT disagg",
              "disagg/coloc", "TT2T coloc", "TT2T disagg", "TT2T overhead ms"]
    out = [header]
    for length in lengths:
        for m in MODELS:
            kv = med(rows, m, "disagg", length, "kv_bytes")
            tc, td = med(rows, m, "colocated", length, "ttft_ms"), med(rows, m, "disagg", length, "ttft_ms")
            sc, sd = med(rows, m, "colocated", length, "tt2t_ms"), med(rows, m, "disagg", length, "tt2t_ms")
            out.append([str(length), m, f"{kv / length:.0f}", f"{kv / 2**20:.2f}",
                        f"{med(rows, m, 'disagg', length, 'send_ms'):.1f}", f"{tc:.1f}", f"{td:.1f}",
                        f"{td / tc:.3f}", f"{sc:.1f}", f"{sd:.1f}", f"{sd - sc:+.1f}"])
    widths = [max(len(row[i]) for row in out) for i in range(len(header))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |" for row in out]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024], help="prompt lengths (tokens)")
    ap.add_argument("--reps", type=int, default=3, help="measured requests per length, model, configuration and round")
    ap.add_argument("--rounds", type=int, default=2, help="times each model x configuration cluster is started")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-lora-rank", type=int, default=256, help="MLA latent rank (DeepSeek-V2: 4 x head_dim)")
    ap.add_argument("--rope-dim", type=int, default=32, help="MLA decoupled rope dims (DeepSeek-V2: head_dim / 2)")
    ap.add_argument("--worker-args", default="--kv-cache-memory-mb 256 --num-threads 1",
                    help="extra flags for every worker (one torch thread each: the same compute for both configurations)")
    ap.add_argument("--request-timeout-s", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--doc", default=str(DOC_PATH))
    ap.add_argument("--no-doc", action="store_true", help="print only")
    args = ap.parse_args()

    load_start, started = os.getloadavg(), datetime.now(timezone.utc)
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}; {os.cpu_count()} CPUs")
    vocab = 2048  # the built-in tokenizer's
    rng = random.Random(args.seed)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="pdserve-mla-bench-") as tmp:
        dirs = write_models(Path(tmp), args.hidden, args.layers, args.heads, args.kv_lora_rank, args.rope_dim, vocab)
        layouts = {m: ModelConfig.from_dir(d).kv_bytes_per_token for m, d in dirs.items()}
        runs = [(m, config) for config in CONFIGS for m in MODELS]  # one cluster at a time, never two at once
        for round_index in range(args.rounds):
            shift = round_index % len(runs)  # the order rotates each round, spreading drifts in machine load
            for m, config in runs[shift:] + runs[:shift]:
                spec = cluster_spec(config, str(dirs[m]), shlex.split(args.worker_args))
                cluster = start_cluster(spec, attempts=3)
                try:
                    t = time.monotonic()
                    got = asyncio.run(measure(cluster, args.lengths, args.reps, vocab, rng, args.request_timeout_s))
                finally:
                    cluster.stop()
                for r in got:
                    r.update(model=m, config=config, round=round_index)
                rows += got
                print(f"round {round_index} {m} {config}: {len(got)} requests in {time.monotonic() - t:.1f} s, "
                      f"load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    load_end = os.getloadavg()
    result = table(rows, args.lengths)
    per_token = {m: statistics.median(r["kv_bytes"] / r["length"] for r in rows if r["model"] == m and
                                      r["config"] == "disagg") for m in MODELS}
    ratio = per_token["mla"] / per_token["mha"]
    send_ratio = [med(rows, "mla", "disagg", n, "send_ms") / med(rows, "mha", "disagg", n, "send_ms")
                  for n in args.lengths]
    print(result)
    print(f"KV bytes/token on the wire: MLA {per_token['mla']:.0f}, MHA {per_token['mha']:.0f}: MLA/MHA = "
          f"{ratio:.3f} (goal <= 0.25); layouts say {layouts['mla']} and {layouts['mha']} (float32)")
    print(f"send time MLA/MHA per length: {', '.join(f'{n}: {r:.2f}' for n, r in zip(args.lengths, send_ratio))}")
    if args.no_doc:
        return
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    body = f"""
`benchmarks/mla_vs_mha.py` serves two random checkpoints written by transformers' own classes with the
same hidden size ({args.hidden}), depth ({args.layers} layers), heads ({args.heads} x {args.hidden // args.heads}) and
dense MLPs: **MHA** (`LlamaForCausalLM`, K and V per head) and **MLA** (`DeepseekV2ForCausalLM`,
kv_lora_rank {args.kv_lora_rank} + {args.rope_dim} rope dims, no q compression, the V2-Lite proportions). For each model a
colocated cluster and a disaggregated one (1 prefill + 1 decode, `--kv-push chunk`, every request
prefilled remotely, prefix caching off) run one after another, one request at a time.

- Command: `{command}`
- Date: {started.strftime('%Y-%m-%d %H:%M UTC')}; machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), \
float32; load average (1/5/15 min) start {load_start[0]:.2f} / {load_start[1]:.2f} / {load_start[2]:.2f}, \
end {load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f} (other agents share these 2 cores: absolute times are noisy, compare within a row pair)
- Samples: {args.rounds} cluster starts x {args.reps} requests per length, model and configuration (one warm-up
  request per length after each start, not counted; the cluster order rotates each round); 2 output tokens

Medians. `KV B/token` and `KV MiB/req`: bytes decode received (its `pdserve:kv_transfer_bytes_received`),
per prompt token and per request. `send ms/req`: seconds the prefill worker's transport spent
sending (`pdserve:kv_transfer_seconds{{direction="sent"}}`). TT2T includes the transfer tail (decode
admits a request once all its KV has landed); `TT2T overhead` is disaggregated minus colocated.

{result}

- **KV bytes per token on the wire: MLA {per_token['mla']:.0f} vs MHA {per_token['mha']:.0f}, MLA/MHA = {ratio:.3f}**
  (goal <= 0.25: {'met' if ratio <= 0.25 else 'missed'}). The layouts predict {layouts['mla']} and {layouts['mha']} bytes
  (float32: layers x (kv_lora_rank + rope) x 4 vs layers x 2 x heads x head_dim x 4); the wire carries whole 16-token
  blocks, so a prompt's last partial block rounds it up.
- Transfer (send) time MLA/MHA per prompt length: {', '.join(f'{n}: {r:.2f}' for n, r in zip(args.lengths, send_ratio))}.
"""
    replace_section(Path(args.doc), SECTION, body, keep="### Findings")
    print(f"wrote section {SECTION!r} of {args.doc}")


if __name__ == "__main__":
    main()
