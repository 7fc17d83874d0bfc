"""Load-test any OpenAI-compatible server (vLLM, SGLang, the pdserve router): arrivals, datasets
(random, shared-prefix, Mooncake trace replay), TTFT/TPOT/ITL/E2E percentiles, goodput under SLOs,
JSON results and PNG plots. Every run is bounded by --num-prompts and --max-duration-s."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import sys
from fractions import Fraction
from typing import Any, Callable

from .backends import BACKENDS
from .config import ARRIVAL_NAMES, DATASET_NAMES, PROMPT_FORMATS, BenchConfig

logger = logging.getLogger(__name__)
_FIELDS = {f.name: f for f in dataclasses.fields(BenchConfig)}


def _default(name: str) -> object:
    f = _FIELDS[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _float_or_fraction(text: str) -> float:
    return float(Fraction(text)) if "/" in text else float(text)


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    add = _adder(target)
    add("base_url", "server address")
    add("backend", "request format", choices=list(BACKENDS))
    add("model", "model name sent in requests; default: the first id from GET /v1/models")
    add("request_timeout_s", "per-request timeout in seconds", type=float)

    bounds = parser.add_argument_group("bounds and arrivals")
    add = _adder(bounds)
    add("num_prompts", "requests to send at most", type=int)
    add("max_duration_s", "time limit in seconds; in-flight requests are cancelled and counted", type=float)
    add("seed", "seed of datasets and arrivals", type=int)
    add("request_rate", "mean requests/s ('inf': all at once); with a trace, rescales it to this mean rate",
        type=float)
    add("arrival", "arrival process; default: trace for mooncake, gamma if --burstiness != 1, else poisson",
        choices=list(ARRIVAL_NAMES))
    add("burstiness", "gamma shape of inter-arrival gaps: 1 is Poisson, < 1 burstier", type=float)
    add("max_concurrency", "at most this many requests in flight", type=int)
    bounds.add_argument("--sweep", type=_float_list, default=None, metavar="RATES",
                        help="comma list of request rates: one run per rate, a table and goodput_vs_rate.png")

    data = parser.add_argument_group("datasets")
    add = _adder(data)
    add("dataset", "prompt source", choices=list(DATASET_NAMES))
    add("random_input_len", "random: mean prompt tokens", type=int)
    add("random_output_len", "random, shared-prefix: mean max_tokens", type=int)
    add("random_range_ratio", "lengths uniform in [len*(1-r), len*(1+r)]", type=float)
    add("prefix_groups", "shared-prefix: number of system prompts", type=int)
    add("prefix_len", "shared-prefix: tokens per system prompt", type=int)
    add("suffix_len", "shared-prefix: tokens of each request's own part", type=int)
    add("trace", "mooncake: JSONL trace; default: ../shared/data/mooncake/conversation_trace.jsonl of the repo")
    add("time_scale", "mooncake: multiply trace time by this (0.1 = 10x faster)", type=_float_or_fraction)
    add("length_scale", "mooncake: multiply lengths and the block size by this (1/32: 512 -> 16 tokens)",
        type=_float_or_fraction)
    add("max_output_len", "mooncake: cap on max_tokens", type=int)
    add("trace_start_s", "mooncake: skip trace requests before this trace second", type=float)
    add("trace_end_s", "mooncake: stop at this trace second", type=float)
    add("trace_block_size", "mooncake: tokens per hash id in the trace", type=int)
    add("ideal_lru_blocks", "mooncake: besides the unbounded ideal prefix-hit ratio, report the ideal of an "
        "LRU cache of this many blocks (scaled block size; e.g. the prefill worker's KV blocks)", type=int)

    tokens = parser.add_argument_group("prompts and sampling")
    add = _adder(tokens)
    add("prompt_format", "tokens: prompt as a list of ids; text: decoded (lengths may change when the server "
        "re-tokenises); auto: tokens if the backend takes them", choices=list(PROMPT_FORMATS))
    add("tokenizer", "Hugging Face directory with tokenizer.json: prompt ids, text and output token counts")
    add("vocab_size", "without --tokenizer, random ids are drawn below this", type=int)
    add("temperature", "sampling temperature sent to the server", type=float)
    add("ignore_eos", "send ignore_eos so outputs have exactly max_tokens", action=argparse.BooleanOptionalAction)
    add("extra_body", "JSON object merged into every request body", type=_json_object)

    slo = parser.add_argument_group("SLOs and output")
    add = _adder(slo)
    add("slo_ttft_ms", "goodput SLO on time to first token", type=float)
    add("slo_tpot_ms", "goodput SLO on time per output token", type=float)
    add("slo_e2e_ms", "goodput SLO on end-to-end latency", type=float)
    add("percentiles", "comma list of percentiles to report", type=lambda t: tuple(_float_list(t)))
    add("result_json", "write config, per-request records and summary here")
    add("plot_dir", "write latency_cdf.png, throughput.png (and goodput_vs_rate.png) here")
    add("save_output_text", "keep generated text in the JSON records", action=argparse.BooleanOptionalAction)
    add("progress", "show a progress bar", action=argparse.BooleanOptionalAction)


def _adder(group: Any) -> Callable[..., None]:
    """add(field_name, help, **argparse kwargs): one flag per BenchConfig field, its default shown."""

    def add(name: str, help_text: str, **kwargs: object) -> None:
        default = _default(name)
        if default is not None:
            shown = _show(default)
            help_text = f"{help_text} (default: {shown})"
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, default=default, help=help_text, **kwargs)
    return add


def _show(value: object) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    return str(value)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(**{name: getattr(args, name) for name in _FIELDS})


def run(args: argparse.Namespace) -> int:
    from .report import format_summary, format_sweep_table
    from .runner import run_benchmark, run_sweep

    try:
        config = config_from_args(args)
        if args.sweep is not None and (not args.sweep or any(not 0 < r < math.inf for r in args.sweep)):
            raise ValueError(f"--sweep needs positive finite rates, got {args.sweep}")
    except ValueError as exc:
        print(f"pdserve bench: {exc}", file=sys.stderr)
        return 2
    try:
        if args.sweep:
            runs = asyncio.run(run_sweep(config, args.sweep))
        else:
            runs = [asyncio.run(run_benchmark(config))]
    except Exception as exc:  # the CLI edge: show what failed instead of a traceback
        logger.debug("bench failed", exc_info=True)
        print(f"pdserve bench: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for result in runs:
        print(format_summary(result))
    if args.sweep:
        print(format_sweep_table(runs))
    if config.result_json:
        print(f"results: {config.result_json}")
    if config.plot_dir:
        print(f"plots: {config.plot_dir}")
    return 0 if all(r.summary.num_completed > 0 for r in runs) else 1
