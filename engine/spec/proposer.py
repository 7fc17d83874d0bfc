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

    def release(self, seq: Sequence) -> None:
        """`seq` finished or was aborted: drop any state kept for it."""
        ...
