"""What a run leaves behind: the JSON result file, PNG plots and the printed summary tables.

Reads finished `BenchResult`s only. matplotlib is imported inside the plot functions (Agg).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .metrics import LatencyStats

if TYPE_CHECKING:
    from .runner import BenchResult

WIDTH = 50
_LATENCY_TITLES = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2e": ("End-to-end Latency", "E2E"),
}


def write_json(result: BenchResult, path: str) -> None:
    _write(path, result.to_dict())


def write_sweep_json(results: list[BenchResult], path: str) -> None:
    _write(path, {"sweep": [r.config.request_rate for r in results], "runs": [r.to_dict() for r in results]})


def _write(path: str, payload: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, allow_nan=False)  # config.to_dict() already turned inf into null


def format_summary(result: BenchResult) -> str:
    s = result.summary
    rate = result.config.request_rate
    lines = [
        f"{' Serving Benchmark Result ':=^{WIDTH}}",
        _row("Backend:", result.config.backend),
        _row("Model:", result.model),
        _row("Dataset:", result.config.dataset),
        _row("Request rate (req/s):", "inf" if math.isinf(rate) else f"{rate:g}"),
        _row("Max concurrency:", result.config.max_concurrency or "none"),
        _row("Requests planned:", s.num_requests),
        _row("Sent / completed:", f"{s.num_sent} / {s.num_completed}"),
        _row("Failed requests:", s.num_failed),
        _row("Cancelled at time limit:", s.num_cancelled),
        _row("Not sent (time limit):", s.num_not_sent),
        _row("Benchmark duration (s):", f"{s.duration_s:.2f}"),
        _row("Total input tokens:", s.total_input_tokens),
        _row("Total generated tokens:", s.total_output_tokens),
        _row("Request throughput (req/s):", f"{s.request_throughput:.2f}"),
    ]
    if s.goodput is not None:
        slo = ", ".join(f"{k[:-3].upper()}<={v:g}ms" for k, v in s.slo.items() if v is not None)
        lines.append(_row("SLOs:", slo))
        lines.append(_row("Goodput (req/s):", f"{s.goodput:.2f}"))
    lines += [
        _row("Input token throughput (tok/s):", f"{s.input_throughput:.2f}"),
        _row("Output token throughput (tok/s):", f"{s.output_throughput:.2f}"),
        _row("Total token throughput (tok/s):", f"{s.total_token_throughput:.2f}"),
    ]
    if (routes := s.prefill_routes) is not None:
        lines.append(f"{'Prefill routes (pdserve)':-^{WIDTH}}")
        lines.append(_row("Prefilled locally / remotely:", f"{routes.num_local} / {routes.num_remote}"))
        lines.append(_row("Local prefill share:", f"{routes.local_share:.3f}"))
        lines.append(_row("KV bytes moved (MiB):", f"{routes.kv_bytes_moved / 2**20:.2f}"))
    if (hits := s.prefix_hits) is not None and (hits.hit_ratio is not None or hits.ideal_unbounded is not None):
        lines.append(f"{'Prefix cache':-^{WIDTH}}")
        lines.append(_row("Cached prompt tokens (server usage):",
                          "n/a" if hits.hit_ratio is None else hits.cached_tokens))
        lines.append(_row("Prefix-hit ratio:", "n/a" if hits.hit_ratio is None else f"{hits.hit_ratio:.3f}"))
        if hits.ideal_unbounded is not None:
            lines.append(_row("Trace ideal, unbounded cache:", f"{hits.ideal_unbounded:.3f}"))
        if hits.ideal_lru is not None:
            lines.append(_row(f"Trace ideal, LRU {hits.ideal_lru_blocks} blocks:", f"{hits.ideal_lru:.3f}"))
        if hits.hit_ratio is not None and hits.ideal_unbounded:
            lines.append(_row("Measured / unbounded ideal:", f"{hits.hit_ratio / hits.ideal_unbounded:.2f}"))
        if hits.ideal_missed_in_flight_tokens is not None:
            lines.append(_row("Ideal hits missed, prefix in flight:", hits.ideal_missed_in_flight_tokens))
            lines.append(_row("Ideal hits missed, prefix computed:", hits.ideal_missed_computed_tokens))
    if (spec := s.spec_decode) is not None:
        lines.append(f"{'Speculative decoding (server metrics)':-^{WIDTH}}")
        lines.append(_row("Drafts / proposed / accepted tokens:",
                          f"{spec.num_drafts} / {spec.num_draft_tokens} / {spec.num_accepted_tokens}"))
        lines.append(_row("Acceptance rate:", f"{spec.acceptance_rate:.3f}"))
        if spec.mean_acceptance_length is not None:
            lines.append(_row("Mean acceptance length (tokens/step):", f"{spec.mean_acceptance_length:.2f}"))
    if (phases := s.phases) is not None:
        lines.append(f"{'Time per phase (server timing)':-^{WIDTH}}")
        lines.append(_row("Requests reporting:", phases.num_reporting))
        for name, mean in phases.mean_ms.items():
            lines.append(_row(f"{name} mean / p90 (ms):", f"{mean:.2f} / {phases.p90_ms[name]:.2f}"))
        lines.append(_row("Sum of means / client E2E (ms):", f"{phases.sum_of_means_ms:.2f} / {phases.mean_e2e_ms:.2f}"))
        lines.append(_row("Phases explain (of E2E):", f"{100 * phases.coverage:.1f}%"))
    for name, (title, short) in _LATENCY_TITLES.items():
        lines.append(f"{title:-^{WIDTH}}")
        stats: LatencyStats | None = s.latency.get(name)
        if stats is None:
            lines.append(_row(f"{short}:", "n/a"))
            continue
        lines.append(_row(f"Mean {short} (ms):", f"{stats.mean_ms:.2f}"))
        for key, value in stats.percentiles_ms.items():
            lines.append(_row(f"{key.upper()} {short} (ms):", f"{value:.2f}"))
    if s.errors:
        lines.append(f"{'Errors':-^{WIDTH}}")
        lines += [_row(f"{kind}:", count) for kind, count in sorted(s.errors.items())]
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def format_sweep_table(results: list[BenchResult]) -> str:
    header = ["rate", "sent", "ok", "fail", "req/s", "goodput", "out tok/s", "TTFT p50", "TTFT p99",
              "TPOT p50", "TPOT p99", "E2E p99"]
    rows = [header]
    for r in results:
        s = r.summary
        rows.append([
            f"{r.config.request_rate:g}", str(s.num_sent), str(s.num_completed), str(s.num_failed + s.num_cancelled),
            f"{s.request_throughput:.2f}", "-" if s.goodput is None else f"{s.goodput:.2f}",
            f"{s.output_throughput:.1f}",
            _pct(s.latency["ttft"], 50), _pct(s.latency["ttft"], 99),
            _pct(s.latency["tpot"], 50), _pct(s.latency["tpot"], 99), _pct(s.latency["e2e"], 99),
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    out = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "latencies in ms\n" + "\n".join(out)


def plot_run(result: BenchResult, plot_dir: str) -> list[Path]:
    """latency_cdf.png (TTFT, TPOT, E2E) and throughput.png (over time); returns the paths."""
    plt = _pyplot()
    from .metrics import latency_values

    out = Path(plot_dir)
    out.mkdir(parents=True, exist_ok=True)
    values = latency_values(result.results)
    slo = result.summary.slo
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, name, slo_ms in zip(axes, ("ttft", "tpot", "e2e"), (slo["ttft_ms"], slo["tpot_ms"], slo["e2e_ms"])):
        ms = sorted(v * 1000 for v in values[name])
        if ms:
            ax.plot(ms, [(i + 1) / len(ms) for i in range(len(ms))], drawstyle="steps-post")
        if slo_ms is not None:
            ax.axvline(slo_ms, color="red", linestyle="--", label=f"SLO {slo_ms:g} ms")
            ax.legend(loc="lower right")
        ax.set_title(f"{_LATENCY_TITLES[name][1]} CDF ({len(ms)} requests)")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    cdf_path = out / "latency_cdf.png"
    fig.savefig(cdf_path, dpi=100)
    plt.close(fig)

    timeline = result.timeline
    starts = timeline["bin_start_s"]
    edges = starts + [starts[-1] + (starts[1] - starts[0] if len(starts) > 1 else result.summary.duration_s)]
    fig, (ax_tok, ax_req) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ax_tok.stairs(timeline["output_tokens_per_s"], edges)
    ax_tok.set_ylabel("output tokens/s")
    ax_req.stairs(timeline["completed_per_s"], edges, color="tab:green")
    ax_req.set_ylabel("completed requests/s")
    ax_req.set_xlabel("time since start (s)")
    for ax in (ax_tok, ax_req):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    ax_tok.set_title(f"Throughput over time ({result.model}, {result.config.dataset})")
    fig.tight_layout()
    throughput_path = out / "throughput.png"
    fig.savefig(throughput_path, dpi=100)
    plt.close(fig)
    return [cdf_path, throughput_path]


def plot_sweep(results: list[BenchResult], plot_dir: str) -> Path:
    """goodput_vs_rate.png: goodput and throughput vs offered rate, and TTFT/TPOT percentiles."""
    plt = _pyplot()
    out = Path(plot_dir)
    out.mkdir(parents=True, exist_ok=True)
    rates = [r.config.request_rate for r in results]
    fig, (ax_rate, ax_lat) = plt.subplots(1, 2, figsize=(13, 4.5))
    ax_rate.plot(rates, [r.summary.request_throughput for r in results], "o-", label="throughput")
    if all(r.summary.goodput is not None for r in results):
        ax_rate.plot(rates, [r.summary.goodput for r in results], "s-", label="goodput (all SLOs met)")
    ax_rate.plot(rates, rates, ":", color="grey", label="offered")
    ax_rate.set_xlabel("offered request rate (req/s)")
    ax_rate.set_ylabel("requests/s")
    ax_rate.legend()
    for name, style in (("ttft", "o-"), ("tpot", "s-")):
        for p in (50, 99):
            ys = [_pct_value(r.summary.latency[name], p) for r in results]
            ax_lat.plot(rates, [math.nan if y is None else y for y in ys], style, label=f"{name.upper()} p{p}")
    ax_lat.set_xlabel("offered request rate (req/s)")
    ax_lat.set_ylabel("ms")
    ax_lat.legend()
    for ax in (ax_rate, ax_lat):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "goodput_vs_rate.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _row(label: str, value: object) -> str:
    return f"{label:<40}{value!s:>10}"


def _pct_value(stats: LatencyStats | None, p: float) -> float | None:
    if stats is None:
        return None
    return stats.percentiles_ms.get(f"p{p:g}")


def _pct(stats: LatencyStats | None, p: float) -> str:
    value = _pct_value(stats, p)
    return "-" if value is None else f"{value:.1f}"
