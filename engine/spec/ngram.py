"""N-gram (prompt lookup) proposer: the tokens that followed the latest earlier occurrence of the
sequence's last n tokens (longest n first). No model; per sequence, an index of its n-grams kept up to
date as tokens are appended, so a step's lookup is a few dict probes whether or not it finds anything."""

from __future__ import annotations

from pdserve.engine.sequence import Sequence
from pdserve.engine.spec.proposer import Proposal


class NgramIndex:
    """One sequence's n-grams (n = min_n .. max_n), each mapped to the latest position it starts at with a
    token after it. Token lists only grow (a sequence's tokens are never rewritten), so `propose` indexes
    just the tokens appended since its last call."""

    __slots__ = ("min_n", "max_n", "starts", "num_indexed")

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.starts: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_n, max_n + 1)}
        self.num_indexed = 0  # len(tokens) at the last extend

    def extend(self, tokens: list[int]) -> None:
        """Index the windows of `tokens` that gained a following token since the last call."""
        L, old = len(tokens), self.num_indexed
        assert L >= old, (L, old)
        for n, starts in self.starts.items():
            # windows starting at s with s + n <= L - 1; those with s + n <= old - 1 are indexed already
            lo, hi = max(0, old - n), L - n
            if lo < hi:  # later starts overwrite earlier ones: the latest wins
                starts.update(zip(zip(*(tokens[lo + i:hi + i] for i in range(n))), range(lo, hi)))
        self.num_indexed = L

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens following the latest earlier match of tokens' last n (n = max_n .. min_n)."""
        self.extend(tokens)
        if k <= 0:
            return []
        L = len(tokens)
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            s = self.starts[n].get(tuple(tokens[L - n:]))
            if s is not None:
                return tokens[s + n:s + n + k]
        return []


class NgramProposer:
    name = "ngram"
    num_catchup_tokens = 0  # no model, nothing to catch up

    def __init__(self, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes need 1 <= min <= max, got {min_n}..{max_n}")
        self.min_n, self.max_n = min_n, max_n
        self.states: dict[str, NgramIndex] = {}  # req_id -> its n-gram index, until release

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Proposal]:
        proposals = []
        for seq, k in zip(seqs, num_tokens):
            index = self.states.get(seq.req_id)
            if index is None:
                index = self.states[seq.req_id] = NgramIndex(self.min_n, self.max_n)
            proposals.append(Proposal(index.propose(seq.token_ids, k)))
        return proposals

    def lag(self, seq: Sequence) -> int:
        return 0

    def release(self, seq: Sequence) -> None:
        self.states.pop(seq.req_id, None)
