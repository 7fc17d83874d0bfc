"""The planner's window of live signals: every admitted request (when, its prompt and max_tokens), every
finished one (lengths, TTFT, its token gaps, where it was prefilled) and each worker's speed as the router
learnt it from the worker's step times, summed into the `Load` the cost model takes (planner/model.py).

Arrivals, not completions, give the arrival rate and (until enough requests finished) the lengths: when a
split is overloaded its completions run at its capacity, not at the offered load, and with long outputs
the first completions come many seconds after the load changed."""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.planner.model import Load, StepModel, distinct_speeds, pooled


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
class Arrival:
    at: float  # monotonic (or simulated) seconds it was admitted
    prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True, slots=True)
class MeasuredSpeed:
    """One worker's speed as the router learnt it from the worker's step times (router/worker_speed.py)."""

    prefill_s_per_token: float
    decode_fit: tuple[float, float] | None = None  # (fixed, per sequence) seconds; None: it never decoded
    decode_mean: tuple[float, float] = (0.0, 0.0)  # (mean batch, mean step seconds) of its decode steps

    def step(self, base: StepModel, fallback: StepModel) -> StepModel:
        """Its step model: prefill at its own seconds per token; decode as fitted, or `base`'s shape through
        its mean step where the batch barely varied (no slope fitted), or `fallback`'s where it never decoded."""
        if self.decode_fit is None:
            fixed, per_seq = fallback.fixed_s, fallback.per_seq_s
        elif self.decode_fit[1] > 0:
            fixed, per_seq = self.decode_fit
        else:
            batch, step_s = self.decode_mean
            scale = step_s / max(1e-9, base.step_s(max(1.0, batch), 0))
            fixed, per_seq = base.fixed_s * scale, base.per_seq_s * scale
        return StepModel(fixed, per_seq, self.prefill_s_per_token, fallback.per_context_token_s)


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
    num_arrivals: int = 0
    backlog: float = 0.0  # admitted requests still waiting for their first token (counted in arrival_rate)

    def describe(self) -> str:
        queued = f" (backlog {self.backlog:.0f})" if self.backlog >= 0.5 else ""
        return (f"{self.num_arrivals} arrived, {self.num_requests} finished, {self.arrival_rate:.2f}/s{queued}, prompt "
                f"{self.prompt_tokens:.0f} "
                f"({self.cached_tokens:.0f} cached), output {self.output_tokens:.0f}, TTFT p50 "
                f"{1e3 * self.ttft_p50_s:.0f} ms, TPOT p50 {1e3 * self.tpot_p50_s:.1f} ms")


class SignalWindow:
    def __init__(self, window_s: float, min_requests: int) -> None:
        self.window_s = window_s
        self.min_requests = min_requests
        self.requests: deque[FinishedRequest] = deque()
        self.arrivals: deque[Arrival] = deque()

    def add(self, request: FinishedRequest) -> None:
        self.requests.append(request)

    def arrive(self, arrival: Arrival) -> None:
        self.arrivals.append(arrival)

    def snapshot(self, now: float, prefill_s_per_token: float, calibration: StepModel | None = None,
                 mean_decode_batch: float = 1.0, workers: Sequence[MeasuredSpeed] = (),
                 backlog_tokens: float = 0.0) -> Snapshot:
        """Sum the last window_s seconds. The arrival rate and, until `min_requests` finished, the lengths
        (max_tokens for the output) come from the arrivals (from the finished requests when none were
        recorded). The pool's step model is `calibration` (or a default) scaled so that it predicts the
        decode steps measured now at `mean_decode_batch`, with prefill at `prefill_s_per_token`; each of
        `workers` (the router's learnt speeds) gets its own step model, that pool's as its fallback.
        `backlog_tokens` (prompt tokens routed and not yet answered, the policy's queue counts) are requests
        still to serve: over the next window they add backlog / window_s to the arrival rate, so a cluster
        with a long queue is not judged lightly loaded the moment arrivals slow (at the end of the small
        model's overload the planner left colocated for 1P:1D with 20 prompts still queued)."""
        while self.requests and self.requests[0].finished_at < now - self.window_s:
            self.requests.popleft()
        while self.arrivals and self.arrivals[0].at < now - self.window_s:
            self.arrivals.popleft()
        reqs, arrs = list(self.requests), list(self.arrivals)
        n, na = len(reqs), len(arrs)
        if n == 0 and na == 0:
            return Snapshot(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, None)
        if na:
            rate = na / max(1.0, min(self.window_s, now - arrs[0].at))
        else:
            rate = n / max(1.0, min(self.window_s, now - reqs[0].finished_at))
        enough_finished = n >= self.min_requests
        if na and not enough_finished:
            prompt = statistics.fmean(a.prompt_tokens for a in arrs)
            output = statistics.fmean(a.max_tokens for a in arrs)
        else:
            prompt = statistics.fmean(r.prompt_tokens for r in reqs)
            output = statistics.fmean(r.output_tokens for r in reqs)
        backlog = max(0.0, backlog_tokens) / max(1.0, prompt)
        rate += backlog / self.window_s
        # the cache hits of the finished requests, as a share of their prompts
        cached_share = sum(r.cached_tokens for r in reqs) / max(1, sum(r.prompt_tokens for r in reqs))
        cached = cached_share * prompt
        ttft = statistics.median(r.ttft_s for r in reqs) if reqs else 0.0
        tpot = statistics.median(r.tpot_s for r in reqs) if reqs else 0.0
        if max(n, na) < self.min_requests:
            return Snapshot(n, rate, prompt, cached, output, ttft, tpot, None, na, backlog)
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
            stall = 0.5 * max(0.0, statistics.fmean(r.ttft_s for r in reqs) - computed * prefill_s_per_token) \
                if reqs else 0.0
        handoff = statistics.fmean(max(0.0, r.gap1_s - r.gaps_s) for r in remote) if remote else 0.01
        # conditional disaggregation's split of the prefill work, where this window saw a prefill pool at work
        remote_computed = sum(max(0, r.prompt_tokens - r.cached_tokens) for r in reqs if r.remote)
        all_computed = sum(max(0, r.prompt_tokens - r.cached_tokens) for r in reqs)
        remote_share = remote_computed / all_computed if remote_computed and all_computed else 1.0
        # a worker that never decoded (a prefill worker) decodes as the measured ones do, on average
        decoded = [w.step(base, step) for w in workers if w.decode_fit is not None]
        fallback = pooled(decoded) if decoded else step
        steps = distinct_speeds(w.step(base, fallback) for w in workers)
        load = Load(rate, computed, output, pooled(steps) if steps else step, stall_s=stall, handoff_s=handoff,
                    workers=steps, remote_share=remote_share)
        return Snapshot(n, rate, prompt, cached, output, ttft, tpot, load, na, backlog)
