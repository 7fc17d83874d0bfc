"""Sampler: greedy, seeded reproducibility, top-k / top-p keep exactly the right set, validation."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.sampler import Sampler, apply_top_k_top_p, draw
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import InvalidRequest


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]])
    ids, _ = Sampler().sample(logits, [SamplingParams(temperature=0.0)] * 2, [None, None])
    assert ids == [1, 0]


def test_top_k_keeps_k_largest():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    kept = torch.isfinite(apply_top_k_top_p(logits, 2, 1.0)).nonzero().flatten().tolist()
    assert sorted(kept) == [1, 3]


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    kept = lambda p: sorted(torch.isfinite(apply_top_k_top_p(logits, 0, p)).nonzero().flatten().tolist())  # noqa: E731
    assert kept(0.5) == [0]
    assert kept(0.6) == [0, 1]
    assert kept(0.8) == [0, 1]
    assert kept(0.81) == [0, 1, 2]
    assert kept(1.0) == [0, 1, 2, 3]


def test_sampling_stays_inside_top_k():
    torch.manual_seed(0)
    logits = torch.randn(1, 50)
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    sampler = Sampler(seed=1)
    for _ in range(200):
        ids, _ = sampler.sample(logits, [SamplingParams(temperature=2.0, top_k=3)], [None])
        assert ids[0] in allowed


def test_seeded_sampling_reproduces_regardless_of_batch():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.0, seed=42)

    def draw(batch_logits, row):
        g = torch.Generator().manual_seed(42)
        gens = [None] * batch_logits.shape[0]
        gens[row] = g
        params = [SamplingParams(temperature=1.0)] * batch_logits.shape[0]
        params[row] = p
        return Sampler(seed=row).sample(batch_logits, params, gens)[0][row]

    alone = draw(logits[1:2], 0)
    assert draw(logits, 1) == alone
    assert draw(torch.stack([logits[2], logits[1]]), 1) == alone
    # and the draw really is random: another seed gives other tokens over a few draws
    other = [Sampler().sample(logits[1:2], [SamplingParams(temperature=1.0, seed=s)],
                              [torch.Generator().manual_seed(s)])[0][0] for s in range(8)]
    assert len(set(other)) > 1


def test_logprobs_are_log_softmax_of_chosen():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    ids, lps = Sampler().sample(logits, [SamplingParams(temperature=0.0, logprobs=True)], [None])
    assert ids == [2]
    assert lps is not None and abs(lps[0] - torch.log_softmax(logits[0], -1)[2].item()) < 1e-6


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"seed": -1}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
])
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequest, match=field):
        SamplingParams(**kwargs)


def test_batched_filter_matches_the_per_row_reference():
    from pdserve.engine.sampler import apply_top_k_top_p_batch

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 50, generator=g)
    top_k = torch.tensor([0, 3, 50, 0, 7, 1])
    top_p = torch.tensor([1.0, 1.0, 0.9, 0.5, 0.3, 0.2])
    got = apply_top_k_top_p_batch(logits, top_k, top_p)
    for row in range(6):
        want = apply_top_k_top_p(logits[row], int(top_k[row]), float(top_p[row]))
        assert torch.equal(torch.isfinite(got[row]), torch.isfinite(want)), row
        assert torch.equal(got[row][torch.isfinite(got[row])], want[torch.isfinite(want)])


def test_batched_top_p_over_a_large_vocabulary_matches_the_reference():
    """Rows whose top-256 candidates hold top_p (peaked) and rows where they do not (flat: the whole-row
    sort), with and without top-k, against the per-row full sort."""
    from pdserve.engine.sampler import TOP_P_CANDIDATES, apply_top_k_top_p_batch

    g = torch.Generator().manual_seed(7)
    V = 4 * TOP_P_CANDIDATES
    peaked = torch.randn(3, V, generator=g) * 6
    flat = torch.randn(3, V, generator=g) * 0.1
    logits = torch.cat([peaked, flat])
    top_k = torch.tensor([0, 20, 0, 0, 600, 0])
    top_p = torch.tensor([0.9, 0.95, 0.5, 0.9, 0.8, 0.3])
    probs = logits.softmax(-1)
    assert (torch.topk(probs[:3], TOP_P_CANDIDATES).values.sum(-1) > 0.95).all()  # the candidate path
    assert (torch.topk(probs[3:], TOP_P_CANDIDATES).values.sum(-1) < 0.3).all()  # the whole-row path
    got = apply_top_k_top_p_batch(logits, top_k, top_p)
    for row in range(6):
        want = apply_top_k_top_p(logits[row], int(top_k[row]), float(top_p[row]))
        assert torch.equal(torch.isfinite(got[row]), torch.isfinite(want)), row
        assert 1 < int(torch.isfinite(want).sum()) < V, row  # the filters did cut, and kept more than one


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


def test_draw_follows_the_distribution_and_never_picks_zero_mass():
    probs = torch.tensor([0.0, 0.4, 0.0, 0.25, 0.2, 0.1, 0.05, 0.0])  # unnormalised rows work too: x 3
    n = 40000
    u = torch.rand(n, generator=torch.Generator().manual_seed(3))
    ids = draw((probs * 3).expand(n, -1), u)
    counts = torch.bincount(ids, minlength=probs.numel()).double()
    assert counts[probs == 0].sum() == 0
    # chi-square, 4 degrees of freedom: 18.47 is the p = 0.001 bound
    assert _chi_square(counts, probs.double()) < 18.47
    # power: the same counts are far from a neighbouring (shifted) distribution
    assert _chi_square(counts, torch.roll(probs, 1).double()) > 1000
    # the edges: u = 0 takes the first token with mass, u just under 1 the last
    edge = draw(probs[None].expand(2, -1), torch.tensor([0.0, 1.0 - 1e-7]))
    assert edge.tolist() == [1, 6]


def test_temperature_sampling_matches_softmax_of_scaled_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    sampler = Sampler(seed=5)
    n = 6000
    params = [SamplingParams(temperature=0.7)] * n
    ids, _ = sampler.sample(logits.expand(n, -1), params, [None] * n)
    counts = torch.bincount(torch.tensor(ids), minlength=5).double()
    assert _chi_square(counts, (logits[0] / 0.7).softmax(-1).double()) < 18.47  # df 4, p = 0.001
    assert _chi_square(counts, logits[0].softmax(-1).double()) > 50  # temperature 1 would be told apart
