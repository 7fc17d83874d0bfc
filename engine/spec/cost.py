"""Speculation's cost control: how many tokens to speculate this step (0: none) so that the step makes the
most tokens per second, judged from the step times this engine measures on itself.

Speculating trades a forward pass over B rows for one over up to B * (1 + k) rows plus the proposer's own
work (a draft model's k steps). That pays while a step is bound by reading the weights (small batches) and
stops paying once the extra rows cost compute, or when the draft is slow against the target. Where the
crossover lies depends on the machine, the model, the draft and the acceptance, so it is measured rather
than configured: per batch-size bucket, an exponential average of emitted tokens per second for each
choice of k (0, the powers of two below the limit, the limit). The best choice is used; each other one is
tried at least MIN_SAMPLES times first and probed again at doubling intervals (MIN .. MAX_PROBE_INTERVAL
steps of the bucket), so a change of workload, context length or load is noticed.

A draft model that is far behind a sequence (a new sequence's prompt, or many tokens decoded plainly) has
to prefill first, which can cost more than speculating saves: `saving_per_token_s` is what each emitted
token saves at this batch size, which the Speculator weighs against the draft's prefill of that sequence
times its remaining tokens; where plain decoding is best it is 0, so a probe there only speculates with
sequences the draft follows already. Another choice replaces the best only when it is
SWITCH_MARGIN faster, so near-ties do not flap (every change of the best brings the probes back to 8 steps).

Two guards against noise (a median of 3 steps on a shared CPU moves by 10-15 %). The saving a catch-up is
weighed against compares the best's median with plain's fastest recent step, not its median: a k that
only looks faster by chance buys no draft prefills. And a proposer whose own round (a draft forward over the
batch) costs nearly what a plain step does can never pay: k proposals emit at most k + 1 tokens per sequence
for at least k rounds plus a step, so a k whose ceiling (k + 1) * plain / (k * round + plain) is below
1 + SWITCH_MARGIN is never made the best (the built-in tiny's bfloat16 draft runs about as fast as tiny).

Per-sequence acceptance (pausing a sequence whose proposals miss) is the Speculator's; this module
decides per step, for the whole batch.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

WINDOW = 3  # measurements per choice whose median is its rate: one step slowed by something else is outvoted
MIN_SAMPLES = 2  # steps each choice is measured before the rates are compared
MIN_PROBE_INTERVAL = 8  # bucket steps between probes of a choice that is not the best...
MAX_PROBE_INTERVAL = 64  # ...doubling while the best stays the best (a probe of a slow choice: <= 1/64 of steps)
SWITCH_MARGIN = 0.05  # another choice becomes the best when it is this much faster (no flapping between ties)
MAX_PROBE_TRIES = 4  # steps a probe is kept for when they cannot measure it (a draft catching up first)
PROPOSER_EMA_WEIGHT = 0.3  # of the newest round in a bucket's proposer round time


def candidate_ks(max_k: int) -> tuple[int, ...]:
    """The choices of k: 0 (no speculation), 1, 2, 4 ... below max_k, and max_k."""
    ks = {0, max_k}
    k = 1
    while k < max_k:
        ks.add(k)
        k *= 2
    return tuple(sorted(ks))


def bucket_of(num_decodes: int) -> int:
    """Batch sizes measured together: exact up to 8, then buckets of ratio sqrt(2) (9-11, 12-16, 17-22 ...)."""
    if num_decodes <= 8:
        return num_decodes
    return 2 + math.ceil(2 * math.log2(num_decodes))  # 9 -> 9, 11 -> 9, 12 -> 10, 16 -> 10, 17 -> 11


@dataclass(slots=True)
class Choice:
    rates: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))  # tokens per second, newest last
    num_samples: int = 0
    last_measured: int = -1  # the bucket's step count when last measured

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(self.rates) if self.rates else 0.0

    @property
    def fastest_tokens_per_s(self) -> float:
        return max(self.rates, default=0.0)


@dataclass(slots=True)
class Bucket:
    choices: dict[int, Choice]
    num_steps: int = 0  # steps planned in this bucket
    best: int = -1
    next_probe: int = 0
    probe_interval: int = MIN_PROBE_INTERVAL
    probing: int | None = None  # the choice being probed, until a step measures it
    probe_tries: int = 0
    proposer_round_s: float | None = None  # exponential average of one proposer round at this batch size


@dataclass(slots=True)
class SpeculationCost:
    max_k: int
    ks: tuple[int, ...] = field(init=False)
    buckets: dict[int, Bucket] = field(default_factory=dict)  # bucket_of(batch size) -> its measurements
    started_probe: bool = False  # whether the last choose() began a probe (its first step)

    def __post_init__(self) -> None:
        self.ks = candidate_ks(self.max_k)

    def _bucket(self, num_decodes: int) -> Bucket:
        key = bucket_of(num_decodes)
        b = self.buckets.get(key)
        if b is None:
            b = self.buckets[key] = Bucket({k: Choice() for k in self.ks})
        return b

    def choose(self, num_decodes: int) -> int:
        """k for a step decoding `num_decodes` sequences: an unmeasured choice first (largest k first),
        a due probe of the least recently measured other choice, else the best."""
        b = self._bucket(num_decodes)
        b.num_steps += 1
        self.started_probe = False
        unmeasured = [k for k in self.ks if b.choices[k].num_samples < MIN_SAMPLES]
        if unmeasured:
            return min(unmeasured, key=lambda k: (b.choices[k].num_samples, -k))
        if b.probing is None and b.num_steps >= b.next_probe:
            b.next_probe = b.num_steps + b.probe_interval
            b.probe_interval = min(2 * b.probe_interval, MAX_PROBE_INTERVAL)
            b.probing = min((k for k in self.ks if k != b.best), key=lambda k: b.choices[k].last_measured)
            b.probe_tries = 0
            self.started_probe = True
        if b.probing is not None:
            b.probe_tries += 1
            k = b.probing
            if b.probe_tries >= MAX_PROBE_TRIES:
                b.probing = None
            return k
        return b.best

    def saving_per_token_s(self, num_decodes: int) -> float | None:
        """Seconds of step time each emitted token saves at this batch size with the best choice against
        decoding plainly (0 where plain is best). A bucket still being measured answers with its nearest
        measured neighbour's (batch sizes that come and go as requests finish); None before any is."""
        key = bucket_of(num_decodes)
        b = self._bucket(num_decodes)
        if b.best < 0:
            measured = [k for k, x in self.buckets.items() if x.best >= 0]
            if not measured:
                return None
            b = self.buckets[min(measured, key=lambda k: (abs(k - key), -k))]
        # against plain's fastest recent step: a k that is only faster than plain's median by chance saves nothing
        best, plain = b.choices[b.best].tokens_per_s, b.choices[0].fastest_tokens_per_s
        return max(0.0, 1 / plain - 1 / best) if b.best > 0 and best > 0 and plain > 0 else 0.0

    def record_proposer(self, num_decodes: int, round_seconds: float) -> None:
        """One proposer round (a draft forward over the batch, catch-up excluded) took `round_seconds` in a
        step decoding `num_decodes` sequences."""
        if round_seconds <= 0:
            return
        b = self._bucket(num_decodes)
        old = b.proposer_round_s
        b.proposer_round_s = round_seconds if old is None else (
            (1 - PROPOSER_EMA_WEIGHT) * old + PROPOSER_EMA_WEIGHT * round_seconds)

    def ceiling(self, num_decodes: int, k: int) -> float:
        """The most speculating k tokens can speed this batch size up over plain decoding, every proposal
        accepted: (k + 1) tokens per sequence for at least k proposer rounds plus a plain step's work
        (inf while either time is unmeasured)."""
        b = self._bucket(num_decodes)
        plain = b.choices[0].tokens_per_s
        if k == 0 or b.proposer_round_s is None or plain <= 0:
            return math.inf
        plain_step_s = num_decodes / plain
        return (k + 1) * plain_step_s / (k * b.proposer_round_s + plain_step_s)

    def record(self, num_decodes: int, k: int, num_tokens: int, seconds: float) -> None:
        """A decode-only step planned with up to k tokens per sequence (proposals or not) emitted
        num_tokens in `seconds` (proposing, the forward pass and verification)."""
        if seconds <= 0 or k not in self.ks:
            return
        b = self._bucket(num_decodes)
        c = b.choices[k]
        c.rates.append(num_tokens / seconds)
        c.num_samples += 1
        c.last_measured = b.num_steps
        if k == b.probing:
            b.probing = None
        if all(x.num_samples >= MIN_SAMPLES for x in b.choices.values()):
            # a k that cannot pay even with every proposal accepted is not made the best however it measured
            viable = [x for x in self.ks if self.ceiling(num_decodes, x) >= 1 + SWITCH_MARGIN]
            best = max(viable, key=lambda x: b.choices[x].tokens_per_s)
            if best != b.best and (b.best not in viable or b.choices[best].tokens_per_s >
                                   (1 + SWITCH_MARGIN) * b.choices[b.best].tokens_per_s):
                # the ranking changed: look at the others again soon
                b.best = best
                b.probe_interval = MIN_PROBE_INTERVAL
                b.next_probe = b.num_steps + MIN_PROBE_INTERVAL
