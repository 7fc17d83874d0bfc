"""Measured engine step times, summed by kind: steps that computed prompt tokens and pure decode steps.
Cumulative counters (a worker reports them in WorkerStats); whoever learns a speed from them differences two
snapshots (router/worker_speed.py). Measures only; never decides anything."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(slots=True)
class StepTimes:
    num_decode_steps: int = 0  # steps that computed no prompt token
    decode_step_seconds: float = 0.0
    decode_step_seqs: int = 0  # sequences those steps ran, summed over the steps
    num_prefill_steps: int = 0  # steps that computed at least one prompt token
    prefill_step_seconds: float = 0.0
    prefill_step_tokens: int = 0  # prompt tokens those steps computed
    prefill_step_decode_seqs: int = 0  # decoding sequences that ran in those same steps

    def record(self, num_prompt_tokens: int, num_decode_seqs: int, seconds: float) -> None:
        if num_prompt_tokens > 0:
            self.num_prefill_steps += 1
            self.prefill_step_seconds += seconds
            self.prefill_step_tokens += num_prompt_tokens
            self.prefill_step_decode_seqs += num_decode_seqs
        elif num_decode_seqs > 0:
            self.num_decode_steps += 1
            self.decode_step_seconds += seconds
            self.decode_step_seqs += num_decode_seqs

    def copy(self) -> "StepTimes":
        return replace(self)

    @staticmethod
    def fields() -> tuple[str, ...]:
        """The counters, named as WorkerStats names them."""
        return StepTimes.__slots__

    @staticmethod
    def from_stats(stats) -> "StepTimes":
        """From a pb.WorkerStats (a worker that reports none reads as zeros)."""
        return StepTimes(**{k: getattr(stats, k) for k in StepTimes.__slots__})

    def as_dict(self) -> dict[str, int | float]:
        return {k: getattr(self, k) for k in self.__slots__}
