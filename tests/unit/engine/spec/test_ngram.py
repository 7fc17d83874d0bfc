"""N-gram prompt lookup: longest suffix first, latest match, at most k tokens; the per-sequence index
kept up to date as tokens are appended answers what a scan of the whole sequence does."""

from __future__ import annotations

import random

from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sequence import Sequence
from pdserve.engine.spec.ngram import NgramIndex, NgramProposer


def _look(tokens, k=3, min_n=1, max_n=3):
    return NgramIndex(min_n, max_n).propose(list(tokens), k)


def _scan(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """The definition, by brute force: the latest window before the suffix equal to it, longest n first."""
    L = len(tokens)
    if k <= 0:
        return []
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        for s in range(L - n - 1, -1, -1):
            if tokens[s:s + n] == tokens[L - n:]:
                return tokens[s + n:s + n + k]
    return []


def test_follows_the_latest_match_of_the_longest_suffix():
    # suffix (7, 8, 9) occurs once, followed by 1, 2, 3; the 1-gram 9 occurs later followed by 5
    assert _look([7, 8, 9, 1, 2, 3, 9, 5, 0, 7, 8, 9]) == [1, 2, 3]
    assert _look([4, 9, 5, 6, 9, 1, 2, 9], max_n=1) == [1, 2, 9]  # latest 1-gram match, up to the end
    assert _look([1, 2, 3, 1, 2, 3, 1, 2], k=5) == [3, 1, 2]


def test_no_match_no_proposal():
    assert _look([1, 2, 3, 4, 5]) == []
    assert _look([1, 2, 3, 4, 1], min_n=2) == []  # only a 1-gram matches
    assert _look([5]) == []
    assert _look([1, 2, 1], k=0) == []


def test_self_overlapping_repeats():
    assert _look([3, 3, 3, 3], k=2) == [3]
    assert _look([1, 2, 1, 2, 1], k=4, min_n=2, max_n=2) == [2, 1]


def test_index_kept_up_to_date_answers_what_a_scan_does():
    """Tokens appended one or several at a time (accepted runs), lookups with k = 0 in between (steps
    that did not speculate still index): every answer equals a scan of the whole sequence."""
    rng = random.Random(0)
    for trial in range(30):
        min_n = rng.randint(1, 3)
        max_n = rng.randint(min_n, 5)
        vocab = rng.choice([2, 3, 5, 50])
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(0, 40))]
        index = NgramIndex(min_n, max_n)
        for _ in range(60):
            tokens += [rng.randrange(vocab) for _ in range(rng.choice([1, 1, 1, 2, 5]))]
            k = rng.choice([0, 1, 4, 8])
            assert index.propose(tokens, k) == _scan(tokens, min_n, max_n, k), (trial, tokens, k)


def test_proposer_keeps_one_index_per_sequence_until_released():
    proposer = NgramProposer(1, 3)
    a = Sequence("a", [1, 2, 3, 1, 2], SamplingParams())
    b = Sequence("b", [4, 5, 4], SamplingParams())
    assert [p.token_ids for p in proposer.propose([a, b], [2, 2])] == [[3, 1], [5, 4]]
    a.token_ids += [3, 9]
    assert [p.token_ids for p in proposer.propose([a], [3])] == [[]]
    assert set(proposer.states) == {"a", "b"}
    proposer.release(a)
    proposer.release(b)
    assert proposer.states == {}
