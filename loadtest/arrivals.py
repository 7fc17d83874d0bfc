"""When each request is sent: offsets in seconds from the run's start, reproducible by seed.

Processes: `poisson` (exponential gaps), `gamma` (gaps with shape `burstiness`, mean 1/rate;
shape 1 is Poisson), `constant` (gaps of exactly 1/rate) and `trace` (the dataset's own
timestamps). An infinite rate sends everything at once; concurrency limits live in the runner.
"""

from __future__ import annotations

import math

import numpy as np


def arrival_offsets(process: str, num_requests: int, request_rate: float, burstiness: float = 1.0,
                    seed: int = 0, trace_offsets_s: list[float] | None = None) -> list[float]:
    """Non-decreasing send offsets (s) for `num_requests` requests; the first is at 0.

    For `trace`, a finite `request_rate` rescales the trace's gaps so that its mean rate is
    `request_rate` (that is how a sweep replays a trace at several loads).
    """
    if num_requests <= 0:
        return []
    if process == "trace":
        if trace_offsets_s is None or len(trace_offsets_s) != num_requests:
            raise ValueError("arrival 'trace' needs one trace offset per request")
        t0 = trace_offsets_s[0]
        offsets = [t - t0 for t in trace_offsets_s]
        span = offsets[-1]
        if math.isfinite(request_rate) and span > 0 and num_requests > 1:
            factor = (num_requests - 1) / request_rate / span
            offsets = [t * factor for t in offsets]
        return offsets
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    num_gaps = num_requests - 1
    if process == "poisson":
        gaps = rng.exponential(1.0 / request_rate, size=num_gaps)
    elif process == "gamma":
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_gaps)
    elif process == "constant":
        gaps = np.full(num_gaps, 1.0 / request_rate)
    else:
        raise ValueError(f"unknown arrival process {process!r}")
    return [0.0] + np.cumsum(gaps).tolist()
