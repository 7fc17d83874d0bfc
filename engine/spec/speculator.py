"""Speculator: how many tokens each decoding sequence speculates, the proposals, their verification
and the counters. Called by the scheduler (propose, for the decodes it schedules) and by the engine
(verify, after the forward pass).

Speculation turns itself down in two ways. Per sequence, by acceptance: when a sequence's acceptance
rate (an exponential average of accepted / proposed) falls below `speculative_min_acceptance`, it
decodes plainly for a pause that doubles on every failed probe (1, 2, 4 ... 64 steps), so a workload
where proposals miss pays for about one verify in every 64 steps. Per step, by cost
(`speculative_cost_control`, engine/spec/cost.py): the k of each step (0: none) is the one whose
measured tokens per second at this batch size is highest, so where verifying extra rows costs more
than acceptance gives back (larger batches on a CPU) the engine decodes plainly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.model_config import ModelConfig
from pdserve.engine.sequence import Sequence
from pdserve.engine.spec.cost import SpeculationCost
from pdserve.engine.spec.ngram import NgramProposer
from pdserve.engine.spec.proposer import IN_SYNC_TOKENS, Proposal, Proposer
from pdserve.engine.spec.rejection import verify

logger = logging.getLogger(__name__)

EMA_WEIGHT = 0.3  # of the newest verify step in a sequence's acceptance average
MAX_PAUSE_STEPS = 64
# Where plain decoding is measured best, a probe of speculation may start one sequence's draft (a prefill of
# its context): at most this share of the engine's step time goes to such catch-ups. Unbounded, one per probe
# (every <= 64 steps) cost tiny 10-16 % (a 256-token draft prefill is ~7 of its decode steps; r1 2026-12-02).
PROBE_CATCHUP_SHARE = 0.02


@dataclass(slots=True)
class SpecState:
    """A sequence's speculation controller."""

    acceptance: float = 1.0  # exponential average of accepted / proposed (optimistic start)
    pause_steps: int = 0  # plain decode steps left before the next probe
    next_pause: int = 1  # pause after the next failed probe


@dataclass(slots=True)
class PlannedStep:
    """What the cost control needs to judge the step being run."""

    num_decodes: int
    k: int  # the most tokens a sequence may speculate in it
    started: float  # clock() when it was planned (before proposing)
    num_verified: int = 0  # sequences whose proposals were verified
    num_asked: int = 0  # sequences the proposer was asked to propose for (0: the step decoded plainly)
    saving_per_token_s: float | None = None  # what speculating saves per emitted token now (None: unknown)
    num_catchup_tokens: int = 0  # the proposer's catch-up work in it (a draft's prefill): not a typical step
    capped: bool = False  # a sequence near max_tokens speculated fewer than k: not a typical step either
    probe_catch_up: bool = False  # a probe of speculating where plain is best may start one sequence's draft
    probe_caught_up: bool = False  # ...and did: the proposer's catch-up in this step is the probe's cost


class Speculator:
    def __init__(self, config: EngineConfig, proposer: Proposer,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.num_speculative_tokens = config.num_speculative_tokens
        self.min_acceptance = config.speculative_min_acceptance
        self.proposer = proposer
        self.cost = SpeculationCost(config.num_speculative_tokens) if config.speculative_cost_control else None
        self.clock = clock
        self.step: PlannedStep | None = None
        self.seconds_per_catchup_token: float | None = None  # measured, of the proposer's catch-up prefills
        self.step_seconds = 0.0  # of every planned step, start to end
        self.probe_catchup_seconds = 0.0  # of which, catch-ups started by probes (<= PROBE_CATCHUP_SHARE of it)
        self.num_proposed_tokens = 0
        self.num_accepted_tokens = 0
        self.num_drafts = 0  # verify steps with at least one proposed token
        self.num_steps_by_k: dict[int, int] = {}  # k planned -> decode steps (what the cost control chose)

    @property
    def name(self) -> str:
        return self.proposer.name

    def plan(self, num_decodes: int, num_seqs: int) -> int:
        """The most tokens a sequence may speculate in a step decoding `num_decodes` sequences (0: none);
        starts that step's clock. num_seqs: the sequences running or waiting, the batch a sequence that
        starts speculating now will mostly decode in (while a burst of prompts is prefilled, the first of
        them decode in small batches)."""
        if self.cost is None:
            k, saving = self.num_speculative_tokens, None
        else:
            k = self.cost.choose(num_decodes)
            saving = self.cost.saving_per_token_s(max(num_decodes, num_seqs))
        probe_catch_up = (saving == 0.0 and k > 0 and self.cost.started_probe
                          and self.probe_catchup_seconds <= PROBE_CATCHUP_SHARE * self.step_seconds)
        self.step = PlannedStep(num_decodes, k, self.clock(), saving_per_token_s=saving, probe_catch_up=probe_catch_up)
        self.num_steps_by_k[k] = self.num_steps_by_k.get(k, 0) + 1
        return k

    def end_step(self, num_prompt_tokens: int, num_tokens: int) -> None:
        """The planned step emitted num_tokens; a decode-only step's time is the cost control's sample."""
        step, self.step = self.step, None
        if step is None:
            return
        seconds = self.clock() - step.started
        self.step_seconds += seconds
        if self.cost is None or num_prompt_tokens or step.num_catchup_tokens or step.capped:
            return
        # a sample of the planned k even when nothing was proposed: a lookup that found nothing is part of
        # what choosing k costs. But where no sequence could ask (paused, or a draft too far behind), the
        # step was plain decoding: counted as k, it made k look as cheap as plain (tiny with the draft kept
        # k > 0 planned on half the batch-1 steps and started drafts on that, r2 2026-12-02)
        self.cost.record(step.num_decodes, step.k if step.num_asked else 0, num_tokens, seconds)

    def num_tokens_for(self, seq: Sequence, limit: int) -> int:
        """Tokens `seq` may speculate this step, at most `limit` (0: decode plainly)."""
        state = seq.spec
        if state is None:
            state = seq.spec = SpecState()
        if state.pause_steps > 0:
            state.pause_steps -= 1
            return 0
        remaining = seq.params.max_tokens - seq.num_output_tokens
        lag = self.proposer.lag(seq)
        if lag > IN_SYNC_TOKENS and not self._catch_up_pays(lag, remaining):
            if self.step is None or not self.step.probe_catch_up:
                return 0
            # no sequence may be in step with the draft (all new since plain became the best): one catches
            # up, so the probe can measure speculation at all (at most one prefill per probe)
            self.step.probe_catch_up, self.step.probe_caught_up = False, True
        # never past max_tokens: the last token of a request is the target's own draw
        if remaining - 1 < limit and self.step is not None:
            self.step.capped = True
        return max(0, min(limit, remaining - 1))

    def _catch_up_pays(self, lag: int, remaining: int) -> bool:
        """Whether running `lag` tokens through the proposer (a draft's prefill) costs less than speculating
        saves over the sequence's `remaining` tokens at the measured rates (unknown rates: yes, to learn them)."""
        saving = self.step.saving_per_token_s if self.step is not None else None
        if saving is None or self.seconds_per_catchup_token is None:
            return True
        return remaining * saving > lag * self.seconds_per_catchup_token

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Proposal]:
        catchup_before, started = self.proposer.num_catchup_tokens, self.clock()
        if self.step is not None:
            self.step.num_asked += sum(1 for k in num_tokens if k > 0)
        proposals = self.proposer.propose(seqs, num_tokens)
        catchup = self.proposer.num_catchup_tokens - catchup_before
        seconds = self.clock() - started
        num_rounds = max((k for k, p in zip(num_tokens, proposals) if p.token_ids), default=0)
        if not catchup and num_rounds and self.cost is not None and self.step is not None:
            # a draft runs one forward over the batch per proposed position: what a round costs against a
            # plain step bounds what speculating can gain at all
            self.cost.record_proposer(self.step.num_decodes, seconds / num_rounds)
        if catchup:  # an upper bound per token: the call also drew the proposals
            if self.step is not None and self.step.probe_caught_up:
                self.probe_catchup_seconds += seconds
            rate = seconds / catchup
            old = self.seconds_per_catchup_token
            self.seconds_per_catchup_token = rate if old is None else (1 - EMA_WEIGHT) * old + EMA_WEIGHT * rate
        if self.step is not None:
            self.step.num_catchup_tokens += catchup
        for p, k in zip(proposals, num_tokens):
            assert len(p.token_ids) <= k, (len(p.token_ids), k)
        return proposals

    def verify(self, seq: Sequence, logits: torch.Tensor, proposal: list[int], draft_probs: torch.Tensor | None,
               generator: torch.Generator) -> list[int]:
        """Emitted tokens (accepted proposals, then one from the target) for `seq`; updates its controller."""
        tokens, num_accepted = verify(logits, proposal, draft_probs, seq.params, generator)
        m = len(proposal)
        if m:
            if self.step is not None:
                self.step.num_verified += 1
            self.num_proposed_tokens += m
            self.num_accepted_tokens += num_accepted
            self.num_drafts += 1
            self._record(seq, num_accepted / m)
        return tokens

    def _record(self, seq: Sequence, rate: float) -> None:
        state = seq.spec
        assert state is not None
        state.acceptance = (1 - EMA_WEIGHT) * state.acceptance + EMA_WEIGHT * rate
        if state.acceptance >= self.min_acceptance:
            state.next_pause = 1
            return
        state.pause_steps = state.next_pause
        state.next_pause = min(2 * state.next_pause, MAX_PAUSE_STEPS)
        state.acceptance = self.min_acceptance  # one good probe lifts it back above
        logger.debug("%s: acceptance below %.2f, plain decode for %d steps", seq.req_id, self.min_acceptance,
                     state.pause_steps)

    def release(self, seq: Sequence) -> None:
        self.proposer.release(seq)

    def stats(self) -> dict[str, int]:
        return {"spec_proposed_tokens": self.num_proposed_tokens, "spec_accepted_tokens": self.num_accepted_tokens,
                "spec_drafts": self.num_drafts}

    @staticmethod
    def empty_stats() -> dict[str, int]:
        return {"spec_proposed_tokens": 0, "spec_accepted_tokens": 0, "spec_drafts": 0}


def build_speculator(config: EngineConfig, target: ModelConfig, num_blocks: int, max_model_len: int
                     ) -> Speculator | None:
    """The speculator `--speculative` asks for (None: off). The draft model's KV pool gets as many
    blocks as the target's, so it never limits the batch."""
    if config.speculative == "off":
        return None
    if config.speculative == "ngram":
        proposer: Proposer = NgramProposer(config.speculative_ngram_min, config.speculative_ngram_max)
    else:
        from pdserve.engine.builtin_model import builtin_draft_for
        from pdserve.engine.spec.draft import DraftProposer

        target_dir = Path(config.model)
        if config.draft_model:
            draft_dir = Path(config.draft_model)
        else:
            draft_dir = builtin_draft_for(target_dir)
            if draft_dir is None:
                raise ValueError(f"--speculative draft: give --draft-model DIR (a smaller model with the tokenizer "
                                 f"of {target_dir}); only the built-in models have a built-in draft")
        proposer = DraftProposer(config, draft_dir, target_dir, target, num_blocks, max_model_len)
    logger.info("speculative decoding: %s, up to %d tokens per step%s", proposer.name, config.num_speculative_tokens,
                ", chosen per step by measured cost" if config.speculative_cost_control else "")
    return Speculator(config, proposer)

