"""Turns a batch of logits into next tokens: greedy, temperature, top-k, top-p, per-request seeds.

Seeded requests draw from their own `torch.Generator`, so their output depends only on their own
logits, never on what else shares the batch.
"""

from __future__ import annotations

import torch

from pdserve.engine.sampling_params import SamplingParams


def apply_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) tokens outside the top-k and outside the smallest set with mass >= top_p. logits: [V]."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (the top token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)  # for requests without their own seed

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None]) -> tuple[list[int], list[float] | None]:
        """logits: [B, V] float32. Returns chosen token ids and, if any request wants them, their logprobs."""
        logits = logits.float()
        token_ids = logits.argmax(-1).tolist()
        for row, p in enumerate(params):
            if p.greedy:
                continue
            scaled = apply_top_k_top_p(logits[row] / p.temperature, p.top_k, p.top_p)
            probs = scaled.softmax(-1)
            gen = generators[row] or self.generator
            token_ids[row] = int(torch.multinomial(probs, 1, generator=gen).item())
        logprobs = None
        if any(p.logprobs for p in params):
            lp = torch.log_softmax(logits, -1)
            logprobs = [float(lp[row, t]) for row, t in enumerate(token_ids)]
        return token_ids, logprobs
