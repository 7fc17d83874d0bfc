"""The planner's cost model: for a candidate prefill/decode split and the observed load, the predicted
TTFT, TPOT, capacity and goodput. Also the worker step-time model (`StepModel`) that the simulator's
workers run on, calibrated on real workers (planner/calibrate.py) or learnt from the router's
measurements.

The model, per worker (rates in requests/s, times in seconds; P = computed prompt tokens per request,
O = output tokens per request):

    step(B, T) = fixed_s + per_seq_s * B + per_token_s * T      B decode sequences, T prefill tokens
    disaggregated (np prefill, nd decode workers; s = remote_share of the prompt tokens goes to the prefill pool,
    the rest the decode workers prefill themselves, as conditional disaggregation does; s = 1 when unobserved):
        prefill: rho_p = (lam/np) s P per_token_s      TTFT_remote = P per_token_s / (1 - rho_p) + fixed_s
        decode:  rho_l = (lam/nd) (1-s) P per_token_s  TTFT_local as colocated's below
                 B = (lam/nd) O TPOT (Little)          TPOT = (fixed_s/(1-rho_l) + handoff_s/(O-1)) / (1 - per_seq_s (lam/nd) O/(1-rho_l))
    colocated (N workers): a worker's decode steps also carry its prefills, and a request's first decode step
    waits behind the prompts queued on its worker (stall_s, measured as the first gap's excess):
        rho_p = (lam/N) P per_token_s                  TPOT = (fixed_s/(1-rho_p) + stall_s/(O-1)) / (1 - per_seq_s (lam/N) O/(1-rho_p))
        TTFT = P per_token_s / (1 - rho_p - per_seq_s (lam/N) O) + fixed_s
    share meeting a target (the predictions are typical values): 1 / (1 + (predicted/target)^4); 1/2 at it.

Workers of different speeds (`Load.workers`, each worker's own step model as the router learnt it, terms
within 2x of the pool's taken at the pool's: distinct_speeds): a
disaggregated split gives its prefill slots to the workers with the fewest seconds per prefill token (as
planner.assign_roles does) and the rest decode; each pool is then one step model of the pool's combined
rate (per field, n over the sum of the reciprocals: the policy spreads a pool's work by speed).
Colocated: each worker takes a share of the requests in proportion to its own capacity
1 / (P per_token_s + O per_seq_s) and is predicted alone at that rate; TTFT and TPOT are the shares' means.

What it leaves out (and the simulator does not): chunk boundaries, preemption, KV capacity, bursts beyond
what stall_s captures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StepModel:
    """Seconds one engine step takes: fixed + per decode sequence + per prefill token (+ per context token)."""

    fixed_s: float = 1.5e-3
    per_seq_s: float = 1.5e-3
    per_token_s: float = 1.2e-4
    per_context_token_s: float = 0.0  # attention reads: per token of context of each decode sequence

    def step_s(self, num_decode_seqs: int, num_prefill_tokens: int, num_context_tokens: int = 0) -> float:
        return (self.fixed_s + self.per_seq_s * num_decode_seqs + self.per_token_s * num_prefill_tokens
                + self.per_context_token_s * num_context_tokens)

    def scaled(self, factor: float) -> "StepModel":
        """The same worker `factor` times slower (a heterogeneous pool's device)."""
        return StepModel(self.fixed_s * factor, self.per_seq_s * factor, self.per_token_s * factor,
                         self.per_context_token_s * factor)


@dataclass(frozen=True, slots=True)
class Split:
    num_prefill: int
    num_decode: int
    num_colocated: int = 0

    @property
    def num_workers(self) -> int:
        return self.num_prefill + self.num_decode + self.num_colocated

    def __str__(self) -> str:
        parts = []
        if self.num_prefill or self.num_decode:
            parts.append(f"{self.num_prefill}P:{self.num_decode}D")
        if self.num_colocated:
            parts.append(f"{self.num_colocated} colocated")
        return "+".join(parts) or "no workers"


def candidate_splits(num_workers: int) -> list[Split]:
    """All colocated, then every p prefill : (N - p) decode."""
    if num_workers < 1:
        return []
    return [Split(0, 0, num_workers)] + [Split(p, num_workers - p) for p in range(1, num_workers)]


@dataclass(frozen=True, slots=True)
class Load:
    """What the planner observed over its window."""

    arrival_rate: float  # requests/s
    prompt_tokens: float  # mean computed (not cached) prompt tokens per request
    output_tokens: float  # mean output tokens per request
    step: StepModel  # the workers' step times (learnt or calibrated)
    stall_s: float = 0.0  # colocated: a request's first decode step waits this long behind queued prompts
    handoff_s: float = 0.01  # disaggregated: KV tail and decode admission between first and second token
    workers: tuple[StepModel, ...] = ()  # each worker's own step model; () = every worker runs `step`
    # disaggregated: the share of computed prompt tokens the prefill pool takes; the rest the decode workers
    # prefill themselves (conditional disaggregation: short prompts, overflow). Observed where the window saw
    # remote prefills; 1 (every prompt remote) where it did not
    remote_share: float = 1.0


HETEROGENEOUS_RATIO = 2.0  # a worker's learnt step term this many times off the pool's: its own speed


_STEP_FIELDS = ("fixed_s", "per_seq_s", "per_token_s", "per_context_token_s")


def _pool_value(values: list[float]) -> float:
    """One value for workers that share a pool's work by speed: n / sum(1/x) over the positive ones, n
    counting every worker (0 where none is positive)."""
    pos = [v for v in values if v > 0]
    return len(values) / sum(1.0 / v for v in pos) if pos else 0.0


def distinct_speeds(steps, ratio: float = HETEROGENEOUS_RATIO) -> tuple[StepModel, ...]:
    """The workers' step models with each term grouped: sorted, a term less than `ratio` times the smallest
    of its group joins that group, and every member of a group takes the group's pooled value. So only a
    worker that really differs keeps its own speed. Same-hardware workers measured under different step
    mixes differ by less (a prefill worker's pure prefill steps against a decode worker's prefills carrying
    its batch; a decode slope fitted at batch 3 against one at batch 15): taken as measured, that noise made
    1P:1D look faster than colocated on two equal workers and the planner switched back and forth. Another
    device, dtype or thread count differs by more."""
    steps = list(steps)

    def grouped(values: list[float]) -> list[float]:
        out = list(values)
        order = sorted((v, i) for i, v in enumerate(values) if v > 0)
        k = 0
        while k < len(order):
            m = k
            while m < len(order) and order[m][0] < ratio * order[k][0]:
                m += 1
            shared = _pool_value([v for v, _ in order[k:m]])
            for _, i in order[k:m]:
                out[i] = shared
            k = m
        return out
    cols = [grouped([getattr(s, f) for s in steps]) for f in _STEP_FIELDS]
    return tuple(StepModel(*vals) for vals in zip(*cols))


def pooled(steps) -> StepModel:
    """One step model for a pool that spreads its work by speed: per field, n / sum(1/x) (fields that are 0
    everywhere stay 0)."""
    steps = list(steps)
    return StepModel(*(_pool_value([getattr(s, f) for s in steps]) for f in _STEP_FIELDS))


@dataclass(frozen=True, slots=True)
class Prediction:
    split: Split
    ttft_s: float
    tpot_s: float
    capacity_rps: float  # arrival rate at which a queue grows without bound
    goodput_rps: float  # predicted requests/s meeting both targets
    utilization: float  # arrival rate / capacity

    def describe(self) -> str:
        return (f"{self.split}: TTFT {_ms(self.ttft_s)}, TPOT {_ms(self.tpot_s)}, capacity {self.capacity_rps:.1f}/s, "
                f"goodput {self.goodput_rps:.2f}/s")


def _ms(s: float) -> str:
    return "inf" if math.isinf(s) else f"{1e3 * s:.0f} ms"


def share_meeting(predicted_s: float, target_s: float) -> float:
    if math.isinf(predicted_s):
        return 0.0
    return 1.0 / (1.0 + (predicted_s / target_s) ** 4)


def _colocated(r: float, p: float, o: float, st: StepModel, stall_s: float) -> tuple[float, float]:
    """(TTFT, TPOT) of one colocated worker taking `r` requests/s."""
    rho_p = r * p * st.per_token_s
    rho_d = r * o * st.per_seq_s
    if rho_p + rho_d >= 1:
        return math.inf, math.inf
    ttft = p * st.per_token_s / (1 - rho_p - rho_d) + st.fixed_s
    tpot = (st.fixed_s / (1 - rho_p) + stall_s / max(1.0, o - 1)) / (1 - rho_d / (1 - rho_p))
    return ttft, tpot


def predict(split: Split, load: Load, ttft_target_s: float, tpot_target_s: float) -> Prediction:
    lam, p, o = load.arrival_rate, max(1.0, load.prompt_tokens), max(1.0, load.output_tokens)
    inf = math.inf
    steps = list(load.workers) if len(load.workers) == split.num_workers else [load.step] * split.num_workers
    if split.num_colocated and not (split.num_prefill or split.num_decode):
        caps = [1.0 / (p * st.per_token_s + o * st.per_seq_s) for st in steps]
        capacity = sum(caps)
        parts = [_colocated(lam * c / capacity, p, o, st, load.stall_s) for c, st in zip(caps, steps)]
        ttft = sum(c * t for c, (t, _) in zip(caps, parts)) / capacity
        tpot = sum(c * t for c, (_, t) in zip(caps, parts)) / capacity
    else:
        np_, nd = split.num_prefill, split.num_decode
        if np_ < 1 or nd < 1 or split.num_colocated:
            return Prediction(split, inf, inf, 0.0, 0.0, inf)  # mixed splits are not candidates
        by_prefill_speed = sorted(steps, key=lambda st: st.per_token_s)
        pre, dec = pooled(by_prefill_speed[:np_]), pooled(by_prefill_speed[np_:])
        share = min(1.0, max(0.0, load.remote_share))
        rho_p = lam / np_ * share * p * pre.per_token_s
        rho_l = lam / nd * (1 - share) * p * dec.per_token_s  # the decode workers' own prefills
        rho_d = lam / nd * o * dec.per_seq_s
        per_decode = o * dec.per_seq_s + (1 - share) * p * dec.per_token_s
        capacity = min(np_ / (share * p * pre.per_token_s) if share > 0 else inf,
                       nd / per_decode if per_decode > 0 else inf)
        remote_ttft = inf if rho_p >= 1 else p * pre.per_token_s / (1 - rho_p) + pre.fixed_s
        local_ttft = inf if rho_l + rho_d >= 1 else p * dec.per_token_s / (1 - rho_l - rho_d) + dec.fixed_s
        ttft = remote_ttft if share >= 1 else share * remote_ttft + (1 - share) * local_ttft
        tpot = inf if rho_l + rho_d >= 1 else \
            (dec.fixed_s / (1 - rho_l) + load.handoff_s / max(1.0, o - 1)) / (1 - rho_d / (1 - rho_l))
    meet = min(share_meeting(ttft, ttft_target_s), share_meeting(tpot, tpot_target_s))
    return Prediction(split, ttft, tpot, capacity, lam * meet, lam / capacity if capacity > 0 else inf)
