"""The proposer interface: given running sequences, propose up to k next tokens for each.

A proposal may carry the proposer's own distribution over each proposed token (a draft model's);
without one it is deterministic (n-gram lookup) and the rejection sampler treats it as one-hot.
EAGLE/Medusa-style heads would be a third implementation of the same Protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from pdserve.engine.sequence import Sequence

# A proposer at most this many tokens behind a sequence (a draft model that has not yet run the newest
# tokens) catches up within an ordinary step; further behind (a new sequence's prompt, or many tokens
# decoded without speculation) it runs a prefill first, which costs more than a step saves.
IN_SYNC_TOKENS = 8


@dataclass(slots=True)
class Proposal:
    token_ids: list[int]
    probs: torch.Tensor | None = None  # [len(token_ids), vocab] float32: the distribution each was drawn from


class Proposer(Protocol):
    name: str
    num_catchup_tokens: int  # tokens it computed to catch up with sequences' contexts (a draft's prefill), so far

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Proposal]:
        """At most num_tokens[i] tokens to follow seqs[i].token_ids (fewer, or none, is fine)."""
        ...

    def lag(self, seq: Sequence) -> int:
        """Tokens of `seq` the proposer would have to run before proposing (0: none, or it needs no model)."""
        ...

    def release(self, seq: Sequence) -> None:
        """`seq` finished or was aborted: drop any state kept for it."""
        ...
