"""N-gram (prompt lookup) proposer: the tokens that followed the latest earlier occurrence of the
sequence's last n tokens (longest n first). No model, no state between steps."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pdserve.engine.sequence import Sequence
from pdserve.engine.spec.proposer import Proposal


class NgramProposer:
    name = "ngram"
    num_catchup_tokens = 0  # no model, nothing to catch up

    def __init__(self, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes need 1 <= min <= max, got {min_n}..{max_n}")
        self.min_n, self.max_n = min_n, max_n

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Proposal]:
        return [Proposal(lookup(np.asarray(s.token_ids, dtype=np.int64), self.min_n, self.max_n, k))
                for s, k in zip(seqs, num_tokens)]

    def lag(self, seq: Sequence) -> int:
        return 0

    def release(self, seq: Sequence) -> None:
        pass


def lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """Up to k tokens following the latest earlier match of tokens' last n (n = max_n .. min_n)."""
    L = len(tokens)
    if k <= 0:
        return []
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        suffix = tokens[L - n:]
        # windows starting at 0 .. L-n-1 (the suffix itself, starting at L-n, excluded)
        windows = sliding_window_view(tokens[:L - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start:start + k].tolist()
    return []
