"""Verification of proposed tokens against the target model's logits (Leviathan et al. 2023, Chen et al.
2023): the emitted tokens are distributed exactly as if the target had sampled them one by one.

Greedy: accept proposals while they equal the target's argmax, then emit the target's argmax.
Sampled: proposal x_i (drawn from the proposer's q_i) is accepted with probability min(1, p_i(x)/q_i(x));
the first rejection emits a draw from norm(max(0, p_i - q_i)); if all are accepted, a bonus token is
drawn from p_m. A proposal without q (n-gram) is deterministic: q_i is one-hot on x_i, so x_i is
accepted with probability p_i(x_i) and a rejection draws from p_i with x_i removed.
"""

from __future__ import annotations

import torch

from pdserve.engine.sampler import apply_top_k_top_p_batch
from pdserve.engine.sampling_params import SamplingParams


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the plain sampler draws from: temperature, top-k, top-p, softmax. [R, V] -> [R, V]."""
    R = logits.shape[0]
    top_k = torch.full((R,), params.top_k, dtype=torch.long)
    top_p = torch.full((R,), params.top_p, dtype=torch.float32)
    return apply_top_k_top_p_batch(logits / params.temperature, top_k, top_p).softmax(-1)


def verify(logits: torch.Tensor, proposal: list[int], draft_probs: torch.Tensor | None, params: SamplingParams,
           generator: torch.Generator) -> tuple[list[int], int]:
    """logits [m + 1, V] float32: row i is the target's next-token logits after the context and proposal[:i].
    draft_probs [m, V] or None. Returns (emitted tokens, number of proposals accepted); 1 <= len(tokens) <= m + 1."""
    m = len(proposal)
    if params.greedy:
        best = logits.argmax(-1).tolist()
        n = 0
        while n < m and proposal[n] == best[n]:
            n += 1
        return proposal[:n] + [best[n]], n
    p = target_probs(logits, params)  # [m + 1, V]
    if m:
        x = torch.tensor(proposal)
        rows = torch.arange(m)
        p_x = p[rows, x]
        q_x = draft_probs[rows, x] if draft_probs is not None else torch.ones(m)
        u = torch.rand(m, generator=generator)
        rejected = (u * q_x >= p_x).nonzero()
        n = int(rejected[0]) if len(rejected) else m
    else:
        n = 0
    if n < m:
        if draft_probs is not None:
            residual = (p[n] - draft_probs[n]).clamp_(min=0.0)
        else:
            residual = p[n].clone()
            residual[proposal[n]] = 0.0
        # p == q up to rounding: a rejection then has (almost) no mass left; p itself is the limit
        dist = residual if float(residual.sum()) > 1e-12 else p[n]
    else:
        dist = p[m]
    last = int(torch.multinomial(dist, 1, generator=generator)[0])
    return proposal[:n] + [last], n
