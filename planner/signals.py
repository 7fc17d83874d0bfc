"""The planner's window of live signals: every finished request (lengths, TTFT, its token gaps, where
it was prefilled), summed into the `Load` the cost model takes (planner/model.py)."""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

from pdserve.planner.model import Load, StepModel


@dataclass(frozen=True, slots=True)
class FinishedRequest:
    finished_at: float  # monotonic seconds (or simulated seconds)
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    ttft_s: float
    tpot_s: float  # mean gap after the first token (0 for one-token outputs)
    gap1_s: float  # first to second token
    gaps_s: float  # mean of the later gaps (pure decode steps)
    remote: bool  # prefilled on a prefill worker
    decode_batch: float = 0.0  # decode worker's running sequences when it finished (0: unknown)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The window summed up; `load` is None with fewer than the minimum requests."""

    num_requests: int
    arrival_rate: float
    prompt_tokens: float
    cached_tokens: float
    output_tokens: float
    ttft_p50_s: float
    tpot_p50_s: float
    load: Load | None

    def describe(self) -> str:
        return (f"{self.num_requests} requests, {self.arrival_rate:.2f}/s, prompt {self.prompt_tokens:.0f} "
                f"({self.cached_tokens:.0f} cached), output {self.output_tokens:.0f}, TTFT p50 "
                f"{1e3 * self.ttft_p50_s:.0f} ms, TPOT p50 {1e3 * self.tpot_p50_s:.1f} ms")


class SignalWindow:
    def __init__(self, window_s: float, min_requests: int) -> None:
        self.window_s = window_s
        self.min_requests = min_requests
        self.requests: deque[FinishedRequest] = deque()

    def add(self, request: FinishedRequest) -> None:
        self.requests.append(request)

    def snapshot(self, now: float, prefill_s_per_token: float, calibration: StepModel | None = None,
                 mean_decode_batch: float = 1.0) -> Snapshot:
        """Sum the last window_s seconds. The step model is `calibration` (or a default) scaled so that it
        predicts the decode steps measured now at `mean_decode_batch`, with prefill at the router's
        measured seconds per token."""
        while self.requests and self.requests[0].finished_at < now - self.window_s:
            self.requests.popleft()
        reqs = list(self.requests)
        n = len(reqs)
        if n == 0:
            return Snapshot(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, None)
        span = max(1.0, min(self.window_s, now - reqs[0].finished_at))
        rate = n / span
        prompt = statistics.fmean(r.prompt_tokens for r in reqs)
        cached = statistics.fmean(r.cached_tokens for r in reqs)
        output = statistics.fmean(r.output_tokens for r in reqs)
        ttft = statistics.median(r.ttft_s for r in reqs)
        tpot = statistics.median(r.tpot_s for r in reqs)
        if n < self.min_requests:
            return Snapshot(n, rate, prompt, cached, output, ttft, tpot, None)
        base = calibration or StepModel()
        gaps = [r.gaps_s for r in reqs if r.gaps_s > 0]
        batch = max(1.0, mean_decode_batch)
        measured_step = statistics.median(gaps) if gaps else base.step_s(round(batch), 0)
        scale = measured_step / max(1e-9, base.step_s(round(batch), 0))
        step = StepModel(base.fixed_s * scale, base.per_seq_s * scale, prefill_s_per_token,
                         base.per_context_token_s * scale)
        local = [r for r in reqs if not r.remote and r.output_tokens > 2 and r.gaps_s > 0]
        remote = [r for r in reqs if r.remote and r.output_tokens > 2 and r.gaps_s > 0]
        # colocated stall: the first gap's excess over a decode step, where we see local prefills; else half
        # the prompts' queueing wait (what a first decode step would sit behind on a colocated worker)
        computed = max(0.0, prompt - cached)
        if local:  # means, not medians: a stall hits some requests hard and others not at all
            stall = statistics.fmean(max(0.0, r.gap1_s - r.gaps_s) for r in local)
        else:
            stall = 0.5 * max(0.0, statistics.fmean(r.ttft_s for r in reqs) - computed * prefill_s_per_token)
        handoff = statistics.fmean(max(0.0, r.gap1_s - r.gaps_s) for r in remote) if remote else 0.01
        load = Load(rate, computed, output, step, stall_s=stall, handoff_s=handoff)
        return Snapshot(n, rate, prompt, cached, output, ttft, tpot, load)
