"""Metrics math on hand-made results: percentiles, TPOT, ITL, throughput, goodput under SLOs."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.loadtest.metrics import CANCELLED, SLO, latency_stats, summarize, throughput_timeline
from pdserve.loadtest.request import RequestResult


def ok(request_id: str, start: float, chunks: list[float], output_len: int, prompt_len: int = 10) -> RequestResult:
    return RequestResult(request_id, success=True, prompt_len=prompt_len, output_len=output_len,
                         start_time=start, end_time=chunks[-1], chunk_times=chunks)


@pytest.fixture
def results() -> list[RequestResult]:
    return [
        ok("a", 0.0, [0.1, 0.2, 0.3, 0.4], 4),  # TTFT 100 ms, TPOT 100 ms, E2E 400 ms
        ok("b", 1.0, [1.5, 1.7], 2, prompt_len=20),  # TTFT 500 ms, TPOT 200 ms, E2E 700 ms
        ok("c", 2.0, [2.05], 1),  # TTFT 50 ms, no TPOT, E2E 50 ms
        RequestResult("d", error_kind="http_503", prompt_len=10, start_time=2.0, end_time=2.01),
        RequestResult("e", error_kind=CANCELLED, prompt_len=10, start_time=3.0, end_time=4.0),
    ]


def test_per_request_latencies(results: list[RequestResult]) -> None:
    a, b, c = results[:3]
    assert a.ttft_s == pytest.approx(0.1) and a.tpot_s == pytest.approx(0.1) and a.e2e_s == pytest.approx(0.4)
    assert a.itl_s == pytest.approx([0.1, 0.1, 0.1])
    assert b.tpot_s == pytest.approx(0.2)
    assert c.tpot_s is None and c.itl_s == []


def test_latency_stats_percentiles_interpolate_linearly() -> None:
    stats = latency_stats([0.05, 0.1, 0.5], (50, 90, 99))
    assert stats is not None
    assert stats.count == 3
    assert stats.mean_ms == pytest.approx(650 / 3)
    assert stats.min_ms == pytest.approx(50) and stats.max_ms == pytest.approx(500)
    assert stats.percentiles_ms["p50"] == pytest.approx(100)
    assert stats.percentiles_ms["p90"] == pytest.approx(100 + 0.8 * 400)  # rank 1.8 between 100 and 500
    assert stats.percentiles_ms["p99"] == pytest.approx(np.percentile([50, 100, 500], 99))
    assert latency_stats([], (50,)) is None


def test_summary_counts_and_throughput(results: list[RequestResult]) -> None:
    s = summarize(results, num_requests=6, duration_s=4.0, slo=SLO())
    assert (s.num_sent, s.num_completed, s.num_failed, s.num_cancelled, s.num_not_sent) == (5, 3, 1, 1, 1)
    assert s.errors == {"http_503": 1, CANCELLED: 1}
    assert s.total_input_tokens == 40 and s.total_output_tokens == 7
    assert s.request_throughput == pytest.approx(0.75)
    assert s.input_throughput == pytest.approx(10.0)
    assert s.output_throughput == pytest.approx(1.75)
    assert s.total_token_throughput == pytest.approx(11.75)
    assert s.goodput is None and s.num_good is None
    assert s.latency["ttft"].percentiles_ms["p50"] == pytest.approx(100)
    assert s.latency["tpot"].count == 2 and s.latency["tpot"].mean_ms == pytest.approx(150)
    assert s.latency["itl"].count == 4 and s.latency["itl"].mean_ms == pytest.approx(125)
    assert s.latency["e2e"].max_ms == pytest.approx(700)


def test_goodput_counts_requests_meeting_every_slo(results: list[RequestResult]) -> None:
    # a meets both; b misses TTFT; c has no TPOT (one token) and passes that bound; d, e failed.
    s = summarize(results, 5, 4.0, SLO(ttft_ms=200, tpot_ms=150))
    assert s.num_good == 2 and s.goodput == pytest.approx(0.5)
    # TPOT bound 90 ms: a (100 ms) now misses; only c is good.
    assert summarize(results, 5, 4.0, SLO(ttft_ms=200, tpot_ms=90)).num_good == 1
    # E2E only: a (400) and c (50) meet 450 ms, b (700) does not.
    assert summarize(results, 5, 4.0, SLO(e2e_ms=450)).num_good == 2
    # A bound nobody meets.
    assert summarize(results, 5, 4.0, SLO(ttft_ms=10)).goodput == 0.0


def test_throughput_timeline_bins_tokens_and_completions(results: list[RequestResult]) -> None:
    timeline = throughput_timeline(results, t0=0.0, duration_s=4.0, bin_s=1.0)
    assert timeline["bin_start_s"] == [0.0, 1.0, 2.0, 3.0]
    assert sum(timeline["output_tokens_per_s"]) == pytest.approx(7)
    assert timeline["output_tokens_per_s"][0] == pytest.approx(4)
    assert timeline["completed_per_s"] == [1, 1, 1, 0]


def test_phase_breakdown_against_client_e2e():
    from pdserve.loadtest.metrics import phase_breakdown
    from pdserve.loadtest.report import format_summary  # noqa: F401 - the section below is printed by it

    def result(i: int, phases: dict | None, ok: bool = True) -> RequestResult:
        return RequestResult(request_id=str(i), success=ok, start_time=0.0, end_time=1.0, phase_s=phases)

    results = [result(0, {"prefill_compute": 0.2, "decode": 0.7}), result(1, {"prefill_compute": 0.4, "decode": 0.5}),
               result(2, None), result(3, {"decode": 9.0}, ok=False)]
    b = phase_breakdown(results)
    assert b is not None and b.num_reporting == 2
    assert b.mean_ms == pytest.approx({"prefill_compute": 300.0, "decode": 600.0})
    assert b.sum_of_means_ms == pytest.approx(900.0) and b.mean_e2e_ms == pytest.approx(1000.0)
    assert b.coverage == pytest.approx(0.9)
    assert phase_breakdown([result(0, None)]) is None
    assert summarize(results, 4, 1.0, SLO()).phases == b
