"""engine/spec/cost.py: the per-step choice of k from measured tokens per second, against simulated step
costs (a memory-bound step where extra rows are nearly free, a compute-bound one where they are not)."""

from __future__ import annotations

import pytest

from pdserve.engine.spec.cost import (MAX_PROBE_INTERVAL, MAX_PROBE_TRIES, MIN_SAMPLES, SpeculationCost, bucket_of,
                                      candidate_ks)


def test_candidate_ks():
    assert candidate_ks(1) == (0, 1)
    assert candidate_ks(4) == (0, 1, 2, 4)
    assert candidate_ks(7) == (0, 1, 2, 4, 7)
    assert candidate_ks(16) == (0, 1, 2, 4, 8, 16)


def test_buckets_exact_to_8_then_ratio_sqrt2():
    assert [bucket_of(b) for b in range(1, 9)] == list(range(1, 9))
    keys = [bucket_of(b) for b in range(9, 300)]
    assert keys == sorted(keys) and keys[0] > 8
    for key in set(keys):
        members = [b for b in range(9, 300) if bucket_of(b) == key]
        assert max(members) / min(members) <= 2 ** 0.5 + 1e-9


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a sequence emits per verify of k proposals, each accepted with probability `acceptance`."""
    return sum(acceptance ** i for i in range(k + 1))


def simulate(cost: SpeculationCost, batch: int, step_s, acceptance: float, steps: int) -> list[int]:
    """Drives choose/record with a modelled step: step_s(batch, k) seconds, expected tokens emitted."""
    chosen = []
    for _ in range(steps):
        k = cost.choose(batch)
        chosen.append(k)
        cost.record(batch, k, round(batch * expected_tokens(acceptance, k)), step_s(batch, k))
    return chosen


def memory_bound(batch: int, k: int) -> float:  # reading the weights dominates; a draft step costs 0.2 of one
    return 0.030 + 0.0002 * batch * (1 + k) + 0.006 * k


def compute_bound(batch: int, k: int) -> float:  # every row costs
    return 0.010 + 0.005 * batch * (1 + k) + 0.006 * k


def best_k(cost: SpeculationCost, batch: int, step_s, acceptance: float) -> int:
    return max(cost.ks, key=lambda k: batch * expected_tokens(acceptance, k) / step_s(batch, k))


@pytest.mark.parametrize("batch,step_s,acceptance", [(1, memory_bound, 0.9), (1, memory_bound, 0.5),
                                                     (8, compute_bound, 0.9), (8, compute_bound, 0.0),
                                                     (1, memory_bound, 0.0)])
def test_settles_on_the_fastest_k_and_probes_the_others_rarely(batch, step_s, acceptance):
    cost = SpeculationCost(4)
    want = best_k(cost, batch, step_s, acceptance)
    chosen = simulate(cost, batch, step_s, acceptance, 1000)
    assert all(chosen.count(k) >= MIN_SAMPLES for k in cost.ks)  # every choice was measured
    late = chosen[200:]
    assert late.count(want) / len(late) > 0.95, (want, {k: late.count(k) for k in cost.ks})


def test_compute_bound_batch_falls_back_to_no_speculation():
    cost = SpeculationCost(4)
    assert best_k(cost, 8, compute_bound, 0.9) == 0  # speculating is slower there even when almost all is accepted
    chosen = simulate(cost, 8, compute_bound, 0.9, 400)
    assert chosen[-100:].count(0) > 95


def test_batch_sizes_are_judged_apart():
    cost = SpeculationCost(4)
    for _ in range(300):  # a step cost that makes speculation pay at batch 1 and not at 8
        for batch in (1, 8):
            k = cost.choose(batch)
            step_s = memory_bound if batch == 1 else compute_bound
            cost.record(batch, k, round(batch * expected_tokens(0.9, k)), step_s(batch, k))
    assert cost.buckets[bucket_of(1)].best == 4 and cost.buckets[bucket_of(8)].best == 0


def test_a_change_of_acceptance_is_noticed_by_the_probes():
    cost = SpeculationCost(4)
    simulate(cost, 1, memory_bound, 0.9, 300)
    assert cost.buckets[1].best == 4
    # proposals start missing: every k emits one token per sequence, speculating only costs
    chosen = simulate(cost, 1, memory_bound, 0.0, 3 * MAX_PROBE_INTERVAL)
    assert cost.buckets[1].best == 0 and chosen[-MAX_PROBE_INTERVAL:].count(0) > 0.9 * MAX_PROBE_INTERVAL


def test_a_probe_is_kept_until_a_step_measures_it():
    cost = SpeculationCost(4)
    simulate(cost, 8, compute_bound, 0.9, 100)
    b = cost.buckets[8]
    while cost.choose(8) == b.best:  # up to the next probe
        cost.record(8, b.best, 8, compute_bound(8, b.best))
    probe = b.probing
    assert probe is not None and probe != b.best
    # the probed k's steps go unmeasured (a draft catching up): it is kept for MAX_PROBE_TRIES steps, then dropped
    assert [cost.choose(8) for _ in range(MAX_PROBE_TRIES - 1)] == [probe] * (MAX_PROBE_TRIES - 1)
    assert cost.choose(8) == b.best


def test_unmeasured_choices_first_largest_k_first():
    cost = SpeculationCost(4)
    first = []
    for _ in range(len(cost.ks)):
        k = cost.choose(2)
        first.append(k)
        cost.record(2, k, 2, 0.01)
    assert first == [4, 2, 1, 0]


def test_one_step_slowed_by_something_else_does_not_flip_the_choice():
    cost = SpeculationCost(4)
    simulate(cost, 1, memory_bound, 0.9, 100)
    b = cost.buckets[1]
    assert b.best == 4
    cost.record(1, 4, round(expected_tokens(0.9, 4)), 10 * memory_bound(1, 4))  # another process took the cores
    assert b.best == 4


def test_saving_per_token_is_unknown_while_measuring_then_zero_where_plain_is_best():
    cost = SpeculationCost(4)
    assert cost.saving_per_token_s(1) is None and cost.saving_per_token_s(8) is None
    simulate(cost, 1, memory_bound, 0.9, 100)
    simulate(cost, 8, compute_bound, 0.9, 100)
    assert cost.saving_per_token_s(8) == 0.0
    plain_s = memory_bound(1, 0)  # per token at batch 1
    spec_s = memory_bound(1, 4) / round(expected_tokens(0.9, 4))
    assert cost.saving_per_token_s(1) == pytest.approx(plain_s - spec_s)
    assert cost.saving_per_token_s(7) == 0.0 and cost.saving_per_token_s(2) == cost.saving_per_token_s(1)  # neighbours


def test_a_near_tie_does_not_flip_the_best():
    cost = SpeculationCost(4)
    for _ in range(MIN_SAMPLES):
        for k in cost.ks:
            cost.record(1, k, 4 if k == 4 else 1, 0.1)
    b = cost.buckets[1]
    assert b.best == 4
    cost.record(1, 2, 4, 0.098)  # 2 % faster: within the margin
    cost.record(1, 2, 4, 0.098)
    assert b.best == 4
    cost.record(1, 2, 4, 0.08)  # 25 % faster
    cost.record(1, 2, 4, 0.08)
    assert b.best == 2


def _measure_all(cost: SpeculationCost, batch: int, seconds_for_k) -> None:
    """Every choice measured MIN_SAMPLES times, choice k's step taking seconds_for_k(k, i) (i: its sample)."""
    for i in range(MIN_SAMPLES):
        for k in cost.ks:
            cost.record(batch, k, batch, seconds_for_k(k, i))


def test_a_proposer_round_as_slow_as_a_plain_step_never_makes_speculation_the_best():
    """tiny's draft: a round costs what a plain step does, so no k can beat plain even when everything
    is accepted; samples in which k = 4 looks 12 % faster by chance (noise) do not make it the best."""
    noisy = lambda k, i: 0.010 / 1.12 if k == 4 else 0.010  # noqa: E731  plain's rate 100/s, k = 4's 112/s
    fooled = SpeculationCost(4)
    _measure_all(fooled, 1, noisy)
    assert fooled.buckets[1].best == 4  # what the medians alone say
    cost = SpeculationCost(4)
    cost.record_proposer(1, 0.010)  # one draft round: a plain step's time
    _measure_all(cost, 1, noisy)
    assert [cost.ceiling(1, k) < 1.05 for k in cost.ks] == [False, True, True, True]
    assert cost.buckets[1].best == 0 and cost.saving_per_token_s(1) == 0.0
    # a draft at small's 0.59x of the target's step still may (ceiling 5 / 3.36 = 1.49x at k = 4)
    cost = SpeculationCost(4)
    cost.record_proposer(1, 0.0059)
    _measure_all(cost, 1, noisy)
    assert cost.ceiling(1, 4) == pytest.approx(5 / (4 * 0.59 + 1))
    assert cost.buckets[1].best == 4


def test_a_best_that_a_slower_proposer_rules_out_is_replaced_at_once():
    cost = SpeculationCost(4)
    _measure_all(cost, 1, lambda k, i: 0.010 / 1.02 if k == 4 else 0.010)  # k = 4 best by 2 %: within the margin
    assert cost.buckets[1].best == 4
    cost.record_proposer(1, 0.010)
    cost.record(1, 0, 1, 0.010)
    assert cost.buckets[1].best == 0  # not kept for the switch margin: k = 4 cannot pay at all


def test_a_catch_up_saving_is_measured_against_plains_fastest_step():
    """Where k = 4's median beats plain's median only by what plain's own steps vary by, a catch-up
    (a draft prefill) buys nothing: the saving is taken against plain's fastest recent step."""
    cost = SpeculationCost(4)
    plain_s = [0.0100, 0.0085, 0.0100]  # plain's three samples: 100, 118, 100 tokens/s
    for i, s in enumerate(plain_s):
        for k in cost.ks:
            cost.record(1, k, 1, s if k == 0 else 0.0100 / 1.12)  # every k > 0: 112 tokens/s
    b = cost.buckets[1]
    assert b.best > 0  # the medians rank it first (1.12x)...
    assert cost.saving_per_token_s(1) == 0.0  # ...but plain at its fastest is faster still
    for _ in range(3):  # a real saving (1.5x plain's median) still counts, against the fastest plain step
        cost.record(1, b.best, 3, 0.0200)
    assert cost.saving_per_token_s(1) == pytest.approx(0.0085 - 0.0200 / 3)
