#!/usr/bin/env python3
"""Speculative decoding: time per output token (TPOT) with and without it, side by side in one run.

In process (no servers), one engine per configuration over the same model, measured round-robin (each
rep starting with the next configuration; give a multiple of their number as --reps) so load drift on a
shared machine hits every configuration alike: off, ngram, draft (both with the
cost control that picks each step's k from measured step times, the default), and draft-fixed (the
draft proposing k tokens on every step, no cost control); off-again, on request, is a second plain
engine, whose ratio to off is the noise floor of the run. Each configuration first runs every
workload and batch size once untimed (up to 256 tokens), so the cost control starts from its own measurements, as in a
server that has been running. Workloads:
  repetitive  code-like: a chunk of the standard library's Python source, twice (an edit request
              that quotes the code it edits); what n-gram lookup is for. The chunks come from
              stdlib subpackages, outside the text the built-in tokenizer and tiny-copy were trained on
  random      random token ids
The random built-in models never continue a passage by copying it, so n-gram gets no accepted proposals
on `repetitive` with them; --size tiny-copy is the tiny shape trained to copy (builtin_copier.py), the model
to measure n-gram on. A long --output-len on the tiny model measures the other repetitive case, text that
repeats what the sequence itself generated: its greedy output falls into loops after a few hundred tokens
(docs/speculative.md). Every configuration's greedy tokens are compared with off's (they must be identical).
Batch 1 and batch 8 (all requests at once; TPOT = (last token - first token) / (tokens - 1) per request,
mean over requests, median over repetitions). Prints TPOT, the speedup (plain TPOT / speculative TPOT),
the paired speedup (the median over reps of each rep's own plain / speculative ratio),
the acceptance rate, and, for the draft, what prefilling it on the decode worker costs against the
target's prefill (the choice docs/speculative.md explains).

    python benchmarks/speculative.py --size small --reps 3
    python benchmarks/speculative.py --size tiny --workloads random --prompt-len 64 --output-len 3072 --configs off,ngram
    python benchmarks/speculative.py --size small --copy-check 512
    python benchmarks/speculative.py --size tiny-copy --configs off,ngram --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sysconfig
import time
from pathlib import Path

import torch

from pdserve.engine.builtin_model import builtin_draft_for, ensure_builtin_model
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledSeq
from pdserve.engine.sequence import Sequence

CONFIGS: dict[str, dict] = {  # name -> EngineConfig fields
    "off": {"speculative": "off"},
    "off-again": {"speculative": "off"},  # a second plain engine: its ratio to off is the run's noise floor
    "ngram": {"speculative": "ngram"},
    "draft": {"speculative": "draft"},
    "draft-fixed": {"speculative": "draft", "speculative_cost_control": False},
}


# Held out: the built-in tokenizer and tiny-copy train on the top-level stdlib modules only.
CODE_FILES = ("json/decoder.py", "json/encoder.py", "email/utils.py", "asyncio/locks.py", "asyncio/queues.py",
              "importlib/util.py", "logging/handlers.py", "http/cookies.py")


def code_text(model_dir: Path) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for name in CODE_FILES:
        ids += tok.encode((stdlib / name).read_text(encoding="utf-8"), add_special_tokens=False).ids
    return ids


def code_prompts(model_dir: Path, n: int, length: int) -> list[list[int]]:
    ids = code_text(model_dir)
    half = length // 2
    return [ids[i * 2 * half:i * 2 * half + half] * 2 for i in range(n)]


def random_prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (length,), generator=g).tolist() for _ in range(n)]


def tpot_run(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, tag: str
             ) -> tuple[float, list[list[int]]]:
    """Mean TPOT (s) of `prompts` sent together, and each one's output tokens."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    tokens: dict[str, list[int]] = {}
    ids = [f"{tag}-{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            tokens.setdefault(o.req_id, []).extend(o.new_token_ids)
            first.setdefault(o.req_id, now)
            last[o.req_id] = now
    return statistics.mean((last[r] - first[r]) / (len(tokens[r]) - 1) for r in ids), [tokens[r] for r in ids]


def copy_check(engine: LLMEngine, model_dir: Path, num_prompts: int, gen_len: int, k: int) -> list[dict]:
    """Whether the model's greedy output repeats text an n-gram lookup could find (no timing):
    (a) prompt P + C + P, C being the model's own 64-token continuation of P: does it continue with C
    again (as a trained model does when a prompt quotes what it is asked to reproduce)? (b) gen_len
    greedy tokens after a random prompt: distinct tokens, and the tokens per verify step an n-gram
    proposer (k, sizes 2-4) would get over that text (accepted + 1, replayed on the generated tokens).
    (c) prompt Q + Q[:32], Q 128 tokens of held-out stdlib code or random tokens: the fraction of the
    64 greedy tokens equal to Q[32:96] (copying), and the distinct tokens in 256 greedy tokens after Q
    alone (a passage that does not repeat: does the output still vary?)."""
    from pdserve.engine.spec.ngram import NgramIndex

    greedy = lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)  # noqa: E731
    bases = random_prompts(engine.model_config.vocab_size, num_prompts, 64, 7)
    conts = [c.token_ids for c in engine.generate(bases, greedy(64))]
    again = [c.token_ids for c in engine.generate([b + c + b for b, c in zip(bases, conts)], greedy(64))]
    longs = [c.token_ids for c in engine.generate(bases, greedy(gen_len))]
    rows = []
    for b, c, a, out in zip(bases, conts, again, longs):
        prefix = next((i for i, (x, y) in enumerate(zip(c, a)) if x != y), len(c))
        tokens = b + out
        i, steps, index = len(b), 0, NgramIndex(2, 4)
        while i < len(tokens):
            proposal = index.propose(tokens[:i], k)
            n = 0
            while n < len(proposal) and i + n < len(tokens) and tokens[i + n] == proposal[n]:
                n += 1
            i, steps = i + n + 1, steps + 1
        rows.append({"pcp_equal_positions": sum(x == y for x, y in zip(c, a)), "pcp_common_prefix": prefix,
                     "gen_len": len(out), "distinct": len(set(out)), "ngram_tokens_per_step": len(out) / steps})
        print(f"P+C+P continues C: {rows[-1]['pcp_equal_positions']}/64 positions, common prefix {prefix}; "
              f"{len(out)} greedy tokens: {len(set(out))} distinct, n-gram k={k} would emit "
              f"{rows[-1]['ngram_tokens_per_step']:.2f} tokens per verify step")
    text = code_text(model_dir)
    passages = {"code": [text[i * 1000:i * 1000 + 128] for i in range(num_prompts)],
                "random": random_prompts(engine.model_config.vocab_size, num_prompts, 128, 11)}
    for kind, qs in passages.items():
        copies = [c.token_ids for c in engine.generate([q + q[:32] for q in qs], greedy(64))]
        frees = [c.token_ids for c in engine.generate(qs, greedy(256))]
        for q, c, f in zip(qs, copies, frees):
            rows.append({"passage": kind, "copied_positions": sum(x == y for x, y in zip(c, q[32:96])),
                         "distinct_of_256": len(set(f))})
            print(f"{kind} Q + Q[:32] continues Q[32:96]: {rows[-1]['copied_positions']}/64 positions; "
                  f"256 greedy tokens after Q alone: {rows[-1]['distinct_of_256']} distinct")
    return rows


def draft_prefill_cost(target: LLMEngine, draft_engine: LLMEngine, length: int) -> dict[str, float]:
    """Seconds for the target's prefill of one prompt vs the draft's catch-up over it (the draft
    proposer's own runner), and the draft's KV bytes per token against the target's."""
    proposer = draft_engine.scheduler.speculator.proposer
    prompt = random_prompts(target.model_config.vocab_size, 1, length, 5)[0]
    out = {}
    t = time.perf_counter()
    target.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))
    out["target_prefill_s"] = time.perf_counter() - t
    seq = Sequence("draft-cost", prompt, SamplingParams(temperature=0.0))
    seq.block_table = proposer.bm.allocate(proposer.bm.blocks_for_tokens(length))
    t = time.perf_counter()
    for start in range(0, length, proposer.chunk_tokens):  # the chunks it runs, one per decode step
        proposer.runner.execute([ScheduledSeq(seq, min(proposer.chunk_tokens, length - start))])
        seq.num_computed_tokens = min(length, start + proposer.chunk_tokens)
    out["draft_prefill_s"] = time.perf_counter() - t
    proposer.bm.free(seq.block_table)
    out["draft_kv_bytes_per_token_ratio"] = (proposer.kv_cache.nbytes / proposer.bm.num_blocks) / (
        target.kv_cache.nbytes / target.block_manager.num_blocks)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", help="built-in target model (its built-in draft is used)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--workloads", default="repetitive,random")
    parser.add_argument("--copy-check", type=int, default=0, metavar="N",
                        help="only check (no timing) whether the model's greedy text repeats what n-gram lookup "
                             "could find: a prompt quoting the model's own continuation, and N-token generations")
    parser.add_argument("--configs", default=",".join(c for c in CONFIGS if c != "off-again"),
                        help="off first, then the others to compare with it (off-again: a second plain engine, "
                             "the noise floor of the run)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--json", default="", help="write the numbers here")
    args = parser.parse_args()

    model = ensure_builtin_model(args.size)
    if args.copy_check:
        engine = LLMEngine(EngineConfig(model=str(model), num_threads=args.threads, enable_prefix_caching=False,
                                        num_kv_blocks=4096))
        rows = copy_check(engine, model, 3, args.copy_check, args.num_speculative_tokens)
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "copy_check": rows}, indent=2))
        return
    common = dict(model=str(model), num_threads=args.threads, enable_prefix_caching=False, num_kv_blocks=2048,
                  num_speculative_tokens=args.num_speculative_tokens)
    names = [c for c in args.configs.split(",")]
    if names[0] != "off" or any(c not in CONFIGS for c in names):
        parser.error(f"--configs: off first, then any of {', '.join(CONFIGS)}")
    if any(CONFIGS[c]["speculative"] == "draft" for c in names) and builtin_draft_for(model) is None:
        parser.error(f"--size {args.size} has no built-in draft: --configs without draft, draft-fixed")
    engines = {c: LLMEngine(EngineConfig(**CONFIGS[c], **common)) for c in names}
    vocab = engines["off"].model_config.vocab_size
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    workloads = {
        "repetitive": lambda: code_prompts(model, max(batch_sizes), args.prompt_len),
        "random": lambda: random_prompts(vocab, max(batch_sizes), args.prompt_len, 1),
    }
    if any(w not in workloads for w in args.workloads.split(",")):
        parser.error(f"--workloads: any of {', '.join(workloads)}")
    workloads = {w: workloads[w]() for w in args.workloads.split(",")}
    for e in engines.values():  # warm-up: kernels, allocator, and the cost control's first measurements
        for prompts in workloads.values():
            for bsz in batch_sizes:
                tpot_run(e, prompts[:bsz], min(args.output_len, 256), "warm")
    tpot: dict[tuple[str, int, str], list[float]] = {}
    outputs: dict[tuple[str, int, str], list[list[int]]] = {}  # this rep's tokens, compared with off's
    same: dict[tuple[str, int, str], bool] = {}
    accept: dict[tuple[str, int, str], list[int]] = {}
    steps_by_k: dict[tuple[str, int, str], dict[int, int]] = {}
    load_before = os.getloadavg()
    for rep in range(args.reps):
        for wname, prompts in workloads.items():
            for bsz in batch_sizes:
                # each rep starts the group with another configuration: the first run after a change of
                # workload or batch size is slower (r1 of 2026-12-02: off, first in half the groups, read
                # 3-9 % slower than off-again, a copy of it that never was)
                for c in names[rep % len(names):] + names[:rep % len(names)]:
                    e = engines[c]
                    s0, k0 = e.stats(), steps_k(e)
                    t, outputs[(wname, bsz, c)] = tpot_run(e, prompts[:bsz], args.output_len, c)
                    tpot.setdefault((wname, bsz, c), []).append(t)
                    s1, k1 = e.stats(), steps_k(e)
                    a = accept.setdefault((wname, bsz, c), [0, 0])
                    a[0] += s1["spec_accepted_tokens"] - s0["spec_accepted_tokens"]
                    a[1] += s1["spec_proposed_tokens"] - s0["spec_proposed_tokens"]
                    ks = steps_by_k.setdefault((wname, bsz, c), {})
                    for k, n in k1.items():
                        ks[k] = ks.get(k, 0) + n - k0.get(k, 0)
                for c in names:  # greedy: every configuration's tokens must equal off's
                    key = (wname, bsz, c)
                    same[key] = same.get(key, True) and outputs[key] == outputs[(wname, bsz, "off")]
    load_after = os.getloadavg()
    rows = []
    print(f"model {args.size}, k={args.num_speculative_tokens}, prompt {args.prompt_len}, output {args.output_len}, "
          f"{args.reps} reps; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(f"{'workload':<11} {'batch':>5} {'config':<11} {'TPOT ms':>8} {'speedup':>8} {'paired':>7} "
          f"{'accepted/proposed':>18}  same tokens as off  decode steps by k planned")
    for wname in workloads:
        for bsz in batch_sizes:
            base = statistics.median(tpot[(wname, bsz, "off")])
            for c in names:
                t = statistics.median(tpot[(wname, bsz, c)])
                # the median of each rep's own ratio: off and c ran seconds apart, so slow drift cancels
                paired = statistics.median(o / x for o, x in zip(tpot[(wname, bsz, "off")], tpot[(wname, bsz, c)]))
                acc, prop = accept[(wname, bsz, c)]
                rate = f"{acc}/{prop} = {acc / prop:.2f}" if prop else "-"
                ks = {k: n for k, n in sorted(steps_by_k[(wname, bsz, c)].items()) if n}
                parity = "yes" if same[(wname, bsz, c)] else "NO"
                print(f"{wname:<11} {bsz:>5} {c:<11} {t * 1000:>8.2f} {base / t:>7.2f}x {paired:>6.2f}x {rate:>18}  {parity:<18} "
                      f"{' '.join(f'k{k}:{n}' for k, n in ks.items())}")
                rows.append({"workload": wname, "batch": bsz, "config": c, "tpot_ms": t * 1000, "speedup": base / t,
                             "paired_speedup": paired,
                             "same_tokens_as_off": same[(wname, bsz, c)],
                             "tpot_ms_reps": [x * 1000 for x in tpot[(wname, bsz, c)]],
                             "accepted": acc, "proposed": prop, "steps_by_k": ks})
    if "draft" not in engines:
        write_json(args, load_before, load_after, rows, None)
        return
    cost = draft_prefill_cost(engines["off"], engines["draft"], 1024)
    print(f"draft prefill of a 1024-token prompt on the decode worker: {cost['draft_prefill_s'] * 1000:.0f} ms "
          f"vs the target's prefill {cost['target_prefill_s'] * 1000:.0f} ms "
          f"({cost['draft_prefill_s'] / cost['target_prefill_s']:.2f}x); draft KV bytes per token "
          f"{cost['draft_kv_bytes_per_token_ratio']:.2f}x the target's")
    write_json(args, load_before, load_after, rows, cost)


def steps_k(engine: LLMEngine) -> dict[int, int]:
    spec = engine.scheduler.speculator
    return dict(spec.num_steps_by_k) if spec is not None else {}


def write_json(args: argparse.Namespace, load_before, load_after, rows: list[dict], cost: dict | None) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "load_before": load_before,
                                               "load_after": load_after, "rows": rows, "draft_prefill": cost},
                                              indent=2))


if __name__ == "__main__":
    main()
