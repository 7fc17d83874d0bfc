"""One worker's speed as the router learns it from the step times the worker measures (its WorkerStats step
counters, engine/step_times.py): prefill seconds per computed prompt token, and decode step seconds as a
function of the batch size. The registry feeds it each polled WorkerStats; RoutingPolicy reads it (and so do
the planner and the simulator). Learns only; decides nothing.

Between two polls the worker ran some pure decode steps (their seconds, count and summed batch sizes) and
some steps that computed prompt tokens (seconds, prompt tokens, decodes riding along). Decode: each poll is
one point (mean batch, mean step seconds) weighted by its step count; `fixed + per_seq * batch` is fitted
by least squares over decayed sums (flat at the mean while the batch has barely varied). Prefill: the
prefill steps' seconds, less what their decodes cost at the fitted per-sequence rate, over their prompt
tokens, as an EWMA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.step_times import StepTimes

EWMA_WEIGHT = 0.3  # weight of each poll's prefill measurement
DECAY = 0.8  # per poll with decode steps: the weight left to older points of the decode fit
MIN_BATCH_VARIANCE = 0.25  # below it the batch has not varied enough to fit a slope


@dataclass(slots=True)
class WorkerSpeed:
    prefill_s_per_token: float | None = None  # None until the worker reported a prefill step
    num_polls: int = 0  # polls that carried new steps
    last: StepTimes | None = None  # the counters at the previous poll
    # decayed sums over polls with decode steps (w: steps; b: mean batch; t: mean step seconds)
    sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # w, w*b, w*b*b, w*t, w*b*t

    def observe(self, counters: StepTimes) -> None:
        """The worker's cumulative step counters, as polled now."""
        last, self.last = self.last, counters
        if last is None:
            return
        d = {k: getattr(counters, k) - getattr(last, k) for k in StepTimes.fields()}
        if any(v < 0 for v in d.values()):
            return  # the counters restarted (the worker restarted at the same address): a new baseline
        if d["num_decode_steps"] > 0 and d["decode_step_seconds"] > 0:
            n = d["num_decode_steps"]
            b, t = d["decode_step_seqs"] / n, d["decode_step_seconds"] / n
            self.sums = [DECAY * s + x for s, x in zip(self.sums, (n, n * b, n * b * b, n * t, n * b * t))]
        if d["prefill_step_tokens"] > 0 and d["prefill_step_seconds"] > 0:
            decodes_s = d["prefill_step_decode_seqs"] * self.decode_fit()[1] if self.has_decode() else 0.0
            seconds = max(0.5 * d["prefill_step_seconds"], d["prefill_step_seconds"] - decodes_s)
            measured = seconds / d["prefill_step_tokens"]
            prior = self.prefill_s_per_token
            self.prefill_s_per_token = measured if prior is None else prior + EWMA_WEIGHT * (measured - prior)
        if d["num_decode_steps"] or d["num_prefill_steps"]:
            self.num_polls += 1

    def has_decode(self) -> bool:
        return self.sums[0] > 0

    def decode_fit(self) -> tuple[float, float]:
        """(fixed seconds, seconds per decoding sequence) of a decode step; (0, 0) before any was measured."""
        w, wb, wbb, wt, wbt = self.sums
        if w <= 0:
            return 0.0, 0.0
        mean_b, mean_t = wb / w, wt / w
        var = wbb / w - mean_b * mean_b
        if var < MIN_BATCH_VARIANCE:
            return mean_t, 0.0
        per_seq = max(0.0, (wbt / w - mean_b * mean_t) / var)
        fixed = mean_t - per_seq * mean_b
        if fixed < 0:  # steeper than through the origin: keep the mean, proportional to the batch
            return 0.0, mean_t / max(mean_b, 1e-9)
        return fixed, per_seq

    def decode_mean(self) -> tuple[float, float]:
        """(mean batch, mean step seconds) of the decode steps, decayed as the fit's; (0, 0) before any."""
        w, wb, _, wt, _ = self.sums
        return (wb / w, wt / w) if w > 0 else (0.0, 0.0)

    def decode_step_s(self, batch: float) -> float | None:
        """Predicted seconds of a decode step running `batch` sequences; None before any was measured."""
        if not self.has_decode():
            return None
        fixed, per_seq = self.decode_fit()
        return fixed + per_seq * batch
