"""Arrival processes: seeded reproducibility, mean rate, burstiness, trace rescaling."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pdserve.loadtest.arrivals import arrival_offsets


@pytest.mark.parametrize("process", ["poisson", "gamma", "constant"])
def test_seeded_and_non_decreasing(process: str) -> None:
    a = arrival_offsets(process, 500, 20.0, burstiness=0.5, seed=7)
    assert a == arrival_offsets(process, 500, 20.0, burstiness=0.5, seed=7)
    assert a[0] == 0.0 and len(a) == 500
    assert all(x <= y for x, y in zip(a, a[1:]))
    if process != "constant":
        assert a != arrival_offsets(process, 500, 20.0, burstiness=0.5, seed=8)


@pytest.mark.parametrize("process,burstiness", [("poisson", 1.0), ("gamma", 0.25), ("gamma", 4.0), ("constant", 1.0)])
def test_mean_rate(process: str, burstiness: float) -> None:
    n, rate = 20_000, 10.0
    offsets = arrival_offsets(process, n, rate, burstiness=burstiness, seed=1)
    assert (n - 1) / offsets[-1] == pytest.approx(rate, rel=0.05)


def test_burstiness_sets_gap_variability() -> None:
    def cv(burstiness: float) -> float:
        gaps = np.diff(arrival_offsets("gamma", 20_000, 10.0, burstiness=burstiness, seed=3))
        return float(gaps.std() / gaps.mean())

    assert cv(0.25) == pytest.approx(2.0, rel=0.1)  # gamma CV = 1/sqrt(shape)
    assert cv(4.0) == pytest.approx(0.5, rel=0.1)
    poisson_gaps = np.diff(arrival_offsets("poisson", 20_000, 10.0, seed=3))
    assert poisson_gaps.std() / poisson_gaps.mean() == pytest.approx(1.0, rel=0.1)


def test_constant_and_infinite_rate() -> None:
    assert arrival_offsets("constant", 4, 2.0) == [0.0, 0.5, 1.0, 1.5]
    assert arrival_offsets("poisson", 3, math.inf) == [0.0, 0.0, 0.0]
    assert arrival_offsets("poisson", 0, 1.0) == []


def test_trace_offsets_kept_or_rescaled_to_rate() -> None:
    trace = [5.0, 5.0, 6.0, 9.0]
    assert arrival_offsets("trace", 4, math.inf, trace_offsets_s=trace) == [0.0, 0.0, 1.0, 4.0]
    # 3 gaps at a mean 3 req/s span 1 s.
    assert arrival_offsets("trace", 4, 3.0, trace_offsets_s=trace) == pytest.approx([0.0, 0.0, 0.25, 1.0])
    with pytest.raises(ValueError):
        arrival_offsets("trace", 3, math.inf, trace_offsets_s=trace)
    with pytest.raises(ValueError):
        arrival_offsets("uniform", 3, 1.0)
