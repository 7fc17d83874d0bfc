"""Per-request sampling parameters, validated on construction (InvalidRequest says what to fix)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pdserve.errors import InvalidRequest

MAX_STOP_STRINGS = 16
# Seeded draws are keyed on seed + SEED_STRIDE * output_position (mod 2**63); see Sequence.
SEED_STRIDE = 0x9E3779B97F4A7C15
MAX_TOP_LOGPROBS = 20


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False  # return the log-probability of each chosen token
    min_tokens: int = 0

    def __post_init__(self) -> None:
        def bad(msg: str) -> InvalidRequest:
            return InvalidRequest(msg)

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 100.0 \
                or self.temperature != self.temperature:
            raise bad(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise bad(f"top_k must be an integer >= -1 (0 or -1 disable it), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2**63):
            raise bad(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise bad(f"min_tokens must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids must be a list of non-negative integers")
        if len(self.stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in self.stop):
            raise bad(f"stop must be a list of at most {MAX_STOP_STRINGS} non-empty strings")

    def continued(self, num_generated: int) -> "SamplingParams":
        """Parameters for continuing this request after `num_generated` tokens (e.g. on another
        worker after a failure): the remaining budget, and the seed shifted so that the next draws
        are the ones the original request would have made."""
        if num_generated == 0:
            return self
        seed = None if self.seed is None else (self.seed + SEED_STRIDE * num_generated) % 2**63
        return dataclasses.replace(self, max_tokens=self.max_tokens - num_generated,
                                   min_tokens=max(0, self.min_tokens - num_generated), seed=seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
