"""Turns a batch of logits into next tokens: greedy, temperature, top-k, top-p, per-request seeds.

Seeded requests draw from their own `torch.Generator`, so their output depends only on their own
logits, never on what else shares the batch. `sample_step` hands speculative decodes to the
rejection sampler (engine/spec/rejection.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pdserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pdserve.engine.scheduler import ScheduledSeq
    from pdserve.engine.spec.speculator import Speculator


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


def apply_top_k_top_p_batch(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`apply_top_k_top_p` for a whole batch at once. logits [B, V]; top_k [B] long (0: off); top_p [B]
    float (1.0: off). One topk over the batch's largest k; a sort only for the rows that use top-p
    (and then only over their top-k candidates when every one of them also sets top-k)."""
    B, V = logits.shape
    k_on = (top_k > 0) & (top_k < V)
    if bool(k_on.any()):
        k_max = int(top_k[k_on].max())
        top_vals = torch.topk(logits, k_max, dim=-1).values  # [B, k_max], descending
        kth = top_vals.gather(1, (top_k.clamp(1, k_max) - 1)[:, None])  # [B, 1]
        kth = torch.where(k_on[:, None], kth, torch.full_like(kth, float("-inf")))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    p_on = top_p < 1.0
    if bool(p_on.any()):
        rows = p_on.nonzero().flatten()
        sub = logits[rows]
        sorted_logits, order = torch.sort(sub, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (the top token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p[rows][:, None]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.clone()
        logits[rows] = sub.masked_fill(drop, float("-inf"))
    return logits


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)  # for requests without their own seed

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None]) -> tuple[list[int], list[float] | None]:
        """logits: [B, V] float32. Returns chosen token ids and, if any request wants them, their logprobs.

        Greedy rows take the argmax; the others are filtered and normalised together, then drawn:
        seeded rows each from their own generator, the rest in one draw from the engine's."""
        logits = logits.float()
        token_ids = logits.argmax(-1)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            idx = torch.tensor(rows)
            temps = torch.tensor([params[i].temperature for i in rows], dtype=torch.float32)
            top_k = torch.tensor([params[i].top_k for i in rows], dtype=torch.long)
            top_p = torch.tensor([params[i].top_p for i in rows], dtype=torch.float32)
            probs = apply_top_k_top_p_batch(logits[idx] / temps[:, None], top_k, top_p).softmax(-1)
            drawn = torch.empty(len(rows), dtype=torch.long)
            shared = [j for j, i in enumerate(rows) if generators[i] is None]
            for j, i in enumerate(rows):
                gen = generators[i]
                if gen is not None:
                    drawn[j] = torch.multinomial(probs[j], 1, generator=gen)[0]
            if shared:
                sel = torch.tensor(shared)
                drawn[sel] = torch.multinomial(probs[sel], 1, generator=self.generator)[:, 0]
            token_ids[idx] = drawn
        chosen = token_ids.tolist()
        logprobs = None
        if any(p.logprobs for p in params):
            lp = torch.log_softmax(logits, -1)
            logprobs = lp.gather(1, token_ids[:, None])[:, 0].tolist()
        return chosen, logprobs

    def sample_step(self, batch: list[ScheduledSeq], logits: torch.Tensor | None, num_rows: list[int],
                    speculator: Speculator | None) -> list[tuple[list[int], list[float] | None]]:
        """The tokens each item of a step emits, and their logprobs when it asks for them. logits: the
        runner's [sum(num_rows), V], batch[i] owning num_rows[i] consecutive rows. Plain decodes and
        finished prefills emit one token (one batched draw); speculative decodes emit their accepted
        proposals and one more."""
        out: list[tuple[list[int], list[float] | None]] = [([], None)] * len(batch)
        if logits is None:
            return out
        starts, plain = [], []
        row = 0
        for i, n in enumerate(num_rows):
            starts.append(row)
            if n and not batch[i].spec_token_ids:
                plain.append(i)
            row += n
        if plain:
            seqs = [batch[i].seq for i in plain]
            rows = logits[torch.tensor([starts[i] for i in plain])] if len(plain) < logits.shape[0] else logits
            tokens, logprobs = self.sample(rows, [s.params for s in seqs], [s.generator_for_next_token() for s in seqs])
            for j, i in enumerate(plain):
                out[i] = ([tokens[j]], [logprobs[j]] if logprobs is not None and seqs[j].params.logprobs else None)
        for i, item in enumerate(batch):
            if not item.spec_token_ids:
                continue
            assert speculator is not None
            seq = item.seq
            rows = logits[starts[i]:starts[i] + num_rows[i]]
            tokens = speculator.verify(seq, rows, item.spec_token_ids, item.draft_probs,
                                       seq.generator_for_next_token() or self.generator)
            lps = None
            if seq.params.logprobs:
                lps = torch.log_softmax(rows[:len(tokens)], -1).gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()
            out[i] = (tokens, lps)
        return out
