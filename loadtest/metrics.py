"""Statistics of a finished run: latency percentiles, throughputs, goodput under SLOs, errors.

Pure functions over `RequestResult`s; nothing here sends or times anything.
TTFT, TPOT and E2E are per request; ITL pools every gap between streamed chunks of all
successful requests. Throughputs count successful requests only, over the run's duration.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .request import RequestResult
from .server_metrics import SpecDecode

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")
CANCELLED = "cancelled"  # error_kind of requests cut off by the run's time limit


@dataclass(slots=True)
class LatencyStats:
    count: int
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    percentiles_ms: dict[str, float]  # "p50" -> ms


@dataclass(slots=True)
class SLO:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @property
    def is_set(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2e_ms))

    def is_met_by(self, result: RequestResult) -> bool:
        """Success and every set bound met. A one-token output has no TPOT and passes that bound."""
        if not result.success:
            return False
        ttft, tpot, e2e = result.ttft_s, result.tpot_s, result.e2e_s
        if self.ttft_ms is not None and (ttft is None or ttft * 1000 > self.ttft_ms):
            return False
        if self.tpot_ms is not None and tpot is not None and tpot * 1000 > self.tpot_ms:
            return False
        if self.e2e_ms is not None and (e2e is None or e2e * 1000 > self.e2e_ms):
            return False
        return True


@dataclass(slots=True)
class PrefixHits:
    """Prompt tokens the server served from a cache (its usage's cached tokens) against the prompt."""

    num_reporting: int  # successful requests whose usage reported cached tokens
    cached_tokens: int  # summed over those requests
    prompt_tokens: int
    hit_ratio: float | None  # cached_tokens / prompt_tokens; None when no request reported
    # mooncake: the trace's ideal for the same requests and scaling (loadtest.mooncake.ideal_hit_ratio)
    ideal_unbounded: float | None = None
    ideal_lru: float | None = None
    ideal_lru_blocks: int | None = None
    # prompt tokens the unbounded ideal hits and the server missed (loadtest.mooncake.ideal_misses): with no
    # earlier request holding the first missed block past its prefill yet, or with one that was
    ideal_missed_in_flight_tokens: int | None = None
    ideal_missed_computed_tokens: int | None = None


def prefix_hits(results: list[RequestResult]) -> PrefixHits:
    reporting = [r for r in results if r.success and r.usage_cached_tokens is not None]
    cached = sum(r.usage_cached_tokens or 0 for r in reporting)
    prompt = sum(r.prompt_len for r in reporting)
    return PrefixHits(len(reporting), cached, prompt, cached / prompt if prompt else None)


@dataclass(slots=True)
class PrefillRoutes:
    """Where the server computed prompts (pdserve's gRPC API says, per request): on a prefill worker
    (remote) or on the decode worker itself (local), and the KV bytes remote prefills moved."""

    num_reporting: int
    num_local: int
    num_remote: int
    local_share: float
    kv_bytes_moved: int


def prefill_routes(results: list[RequestResult]) -> PrefillRoutes | None:
    reporting = [r for r in results if r.success and r.prefilled_remotely is not None]
    if not reporting:
        return None
    remote = sum(1 for r in reporting if r.prefilled_remotely)
    return PrefillRoutes(len(reporting), len(reporting) - remote, remote, (len(reporting) - remote) / len(reporting),
                         sum(r.kv_bytes_moved or 0 for r in reporting))


@dataclass(slots=True)
class PhaseBreakdown:
    """Where the server says requests' time went (its per-request timing), against the E2E latency
    this client measured for the same requests."""

    num_reporting: int  # successful requests that carried the server's timing
    mean_ms: dict[str, float]  # phase -> mean over those requests
    p90_ms: dict[str, float]
    sum_of_means_ms: float
    mean_e2e_ms: float  # client-measured, over the same requests

    @property
    def coverage(self) -> float:
        """Sum of the phase means over the client's mean E2E: 1.0 when the phases explain it all."""
        return self.sum_of_means_ms / self.mean_e2e_ms if self.mean_e2e_ms else 0.0


def phase_breakdown(results: list[RequestResult]) -> PhaseBreakdown | None:
    reporting = [r for r in results if r.success and r.phase_s and r.e2e_s is not None]
    if not reporting:
        return None
    phases = list(dict.fromkeys(name for r in reporting for name in r.phase_s or {}))
    ms = {name: np.asarray([1000 * (r.phase_s or {}).get(name, 0.0) for r in reporting]) for name in phases}
    mean = {name: float(v.mean()) for name, v in ms.items()}
    return PhaseBreakdown(len(reporting), mean, {name: float(np.percentile(v, 90)) for name, v in ms.items()},
                          sum(mean.values()), float(np.mean([1000 * (r.e2e_s or 0.0) for r in reporting])))


@dataclass(slots=True)
class Summary:
    num_requests: int  # planned by the dataset
    num_sent: int
    num_completed: int
    num_failed: int  # sent, finished with an error
    num_cancelled: int  # sent, cut off by the time limit
    num_not_sent: int  # never sent because the time limit came first
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests/s
    input_throughput: float  # tokens/s
    output_throughput: float  # tokens/s
    total_token_throughput: float
    goodput: float | None  # requests/s meeting every SLO; None without SLOs
    num_good: int | None
    slo: dict[str, float | None]
    latency: dict[str, LatencyStats | None]  # "ttft" | "tpot" | "itl" | "e2e"
    errors: dict[str, int] = field(default_factory=dict)  # error_kind -> count
    prefix_hits: PrefixHits | None = None
    phases: PhaseBreakdown | None = None
    prefill_routes: PrefillRoutes | None = None
    spec_decode: SpecDecode | None = None  # from the server's /metrics, when it reports speculation

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.spec_decode is not None:
            d["spec_decode"].update(acceptance_rate=self.spec_decode.acceptance_rate,
                                    mean_acceptance_length=self.spec_decode.mean_acceptance_length)
        return d


def latency_stats(values_s: list[float], percentiles: tuple[float, ...]) -> LatencyStats | None:
    if not values_s:
        return None
    ms = np.asarray(values_s, dtype=np.float64) * 1000
    return LatencyStats(
        count=len(values_s),
        mean_ms=float(ms.mean()),
        std_ms=float(ms.std()),
        min_ms=float(ms.min()),
        max_ms=float(ms.max()),
        percentiles_ms={_pct_key(p): float(np.percentile(ms, p)) for p in percentiles},
    )


def latency_values(results: list[RequestResult]) -> dict[str, list[float]]:
    """Seconds per metric over successful requests."""
    ok = [r for r in results if r.success]
    return {
        "ttft": [r.ttft_s for r in ok if r.ttft_s is not None],
        "tpot": [r.tpot_s for r in ok if r.tpot_s is not None],
        "itl": [gap for r in ok for gap in r.itl_s],
        "e2e": [r.e2e_s for r in ok if r.e2e_s is not None],
    }


def summarize(results: list[RequestResult], num_requests: int, duration_s: float, slo: SLO,
              percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)) -> Summary:
    ok = [r for r in results if r.success]
    num_cancelled = sum(1 for r in results if not r.success and r.error_kind == CANCELLED)
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_len for r in ok)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    num_good = sum(1 for r in ok if slo.is_met_by(r)) if slo.is_set else None
    values = latency_values(results)
    return Summary(
        num_requests=num_requests,
        num_sent=len(results),
        num_completed=len(ok),
        num_failed=len(results) - len(ok) - num_cancelled,
        num_cancelled=num_cancelled,
        num_not_sent=num_requests - len(results),
        duration_s=duration_s,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=per_s(len(ok)),
        input_throughput=per_s(input_tokens),
        output_throughput=per_s(output_tokens),
        total_token_throughput=per_s(input_tokens + output_tokens),
        goodput=per_s(num_good) if num_good is not None else None,
        num_good=num_good,
        slo={"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "e2e_ms": slo.e2e_ms},
        latency={name: latency_stats(values[name], percentiles) for name in LATENCY_METRICS},
        errors=dict(Counter(r.error_kind or "unknown" for r in results if not r.success)),
        prefix_hits=prefix_hits(results),
        prefill_routes=prefill_routes(results),
        phases=phase_breakdown(results),
    )


def throughput_timeline(results: list[RequestResult], t0: float, duration_s: float,
                        bin_s: float = 1.0) -> dict[str, list[float]]:
    """Per `bin_s` bin from t0: output tokens/s (each streamed chunk weighted by its request's
    output_len / chunks) and completed requests/s."""
    num_bins = max(1, int(np.ceil(duration_s / bin_s)))
    edges = np.arange(num_bins + 1) * bin_s
    ok = [r for r in results if r.success and r.chunk_times]
    chunk_times = [t - t0 for r in ok for t in r.chunk_times]
    weights = [r.output_len / len(r.chunk_times) for r in ok for _ in r.chunk_times]
    tokens, _ = np.histogram(chunk_times, bins=edges, weights=weights)
    done, _ = np.histogram([r.end_time - t0 for r in results if r.success], bins=edges)
    return {
        "bin_start_s": edges[:-1].tolist(),
        "output_tokens_per_s": (tokens / bin_s).tolist(),
        "completed_per_s": (done / bin_s).tolist(),
    }


def _pct_key(p: float) -> str:
    return f"p{p:g}"
