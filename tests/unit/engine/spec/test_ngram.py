"""N-gram prompt lookup: longest suffix first, latest match, at most k tokens."""

from __future__ import annotations

import numpy as np

from pdserve.engine.spec.ngram import lookup


def _look(tokens, k=3, min_n=1, max_n=3):
    return lookup(np.asarray(tokens), min_n, max_n, k)


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
