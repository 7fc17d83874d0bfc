"""The rejection sampler: greedy acceptance rules, and at temperature 1 its emitted tokens follow the
target's distribution (chi-square at a fixed seed; the same bound rejects the draft's distribution,
so the test can fail)."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.spec.rejection import target_probs, verify

V = 6
NUM_TRIALS = 3000
# chi-square critical value, 5 degrees of freedom (V - 1), upper tail 0.001
CHI2_CRIT_DF5 = 20.515


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of observed counts against expected probabilities (cells with p > 0)."""
    n = counts.sum()
    expected = probs * n
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token of zero target probability was emitted"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_greedy_accepts_the_matching_prefix_then_emits_the_argmax():
    logits = torch.full((4, V), -5.0)
    logits[0, 3] = logits[1, 1] = logits[2, 4] = logits[3, 0] = 5.0  # argmax per row: 3, 1, 4, 0
    greedy = SamplingParams(temperature=0.0)
    g = torch.Generator().manual_seed(0)
    assert verify(logits, [3, 1, 4], None, greedy, g) == ([3, 1, 4, 0], 3)  # all accepted + bonus
    assert verify(logits, [3, 2, 4], None, greedy, g) == ([3, 1], 1)  # second rejected: target's token
    assert verify(logits, [0, 1, 4], None, greedy, g) == ([3], 0)
    assert verify(logits[:1], [], None, greedy, g) == ([3], 0)


def _setup():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(3, V, generator=g) * 1.5  # target rows 0, 1, 2
    q = torch.softmax(torch.randn(2, V, generator=g) * 1.5, -1)  # draft distributions of the two proposals
    return logits, q


def _run(logits, q, params, draw_proposals, seed=5):
    g = torch.Generator().manual_seed(seed)
    first = torch.zeros(V)
    second = torch.zeros(V)  # emitted second token, given the first proposal was accepted
    accepted = 0
    for _ in range(NUM_TRIALS):
        proposal = draw_proposals(g)
        tokens, n = verify(logits, proposal, q, params, g)
        first[tokens[0]] += 1
        if n >= 1:
            second[tokens[1]] += 1
        accepted += n
    return first, second, accepted


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=4)],
                         ids=["t1", "t0.7-top4"])
def test_draft_proposals_keep_the_target_distribution(params):
    logits, q = _setup()
    p = target_probs(logits, params)

    def draw(g):
        return [int(torch.multinomial(q[i], 1, generator=g)) for i in range(2)]

    first, second, accepted = _run(logits, q, params, draw)
    assert accepted > NUM_TRIALS * 0.2  # the draft is close enough that proposals are often accepted
    assert chi2(first, p[0]) < CHI2_CRIT_DF5
    assert chi2(second, p[1]) < CHI2_CRIT_DF5
    # power: the same counts are far from the draft's distribution (accepting every proposal would give it)
    assert chi2(first, q[0]) > 10 * CHI2_CRIT_DF5


def test_deterministic_proposals_keep_the_target_distribution():
    """n-gram proposals carry no distribution: one-hot q. Fixed proposal [2, 2]: emitted ~ p, not a point mass."""
    logits, _ = _setup()
    params = SamplingParams(temperature=1.0)
    p = target_probs(logits, params)
    g = torch.Generator().manual_seed(3)
    first = torch.zeros(V)
    second = torch.zeros(V)
    for _ in range(NUM_TRIALS):
        tokens, n = verify(logits, [2, 2], None, params, g)
        first[tokens[0]] += 1
        if n >= 1:
            second[tokens[1]] += 1
    assert chi2(first, p[0]) < CHI2_CRIT_DF5
    assert chi2(second, p[1]) < CHI2_CRIT_DF5
    assert first[2] / NUM_TRIALS == pytest.approx(float(p[0, 2]), abs=0.02)


def test_a_wrong_residual_fails_the_bound():
    """Negative control: drawing the replacement from p itself (not from max(0, p - q)) biases the output
    towards the draft, and the chi-square bound catches it."""
    logits, q = _setup()
    params = SamplingParams(temperature=1.0)
    p = target_probs(logits, params)
    g = torch.Generator().manual_seed(5)
    first = torch.zeros(V)
    for _ in range(NUM_TRIALS):
        x = int(torch.multinomial(q[0], 1, generator=g))
        if float(torch.rand(1, generator=g)) * q[0, x] < p[0, x]:
            first[x] += 1
        else:
            first[int(torch.multinomial(p[0], 1, generator=g))] += 1
    assert chi2(first, p[0]) > CHI2_CRIT_DF5
