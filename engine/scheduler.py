"""Continuous batching with chunked prefill: decides, each step, which tokens of which sequences run.

Running sequences go first (every decode one token, then unfinished prefills a chunk of what is
left of the token budget), then waiting ones in arrival order (FCFS) while the token budget, the batch-size cap and free KV blocks allow.
While sequences decode, the step's prompt tokens are also bounded by time: no more than this worker
computes in `prefill_chunk_ms` at its measured prefill speed (never fewer than `min_prefill_chunk`), so a
model whose prefill is fast gets large chunks (fewer, fuller steps) and a slow one keeps decodes from
waiting behind a long prefill step. A step with no decodes takes the whole budget.
When a decode needs a block and none is free, the most recently admitted running sequence is
preempted: its blocks are freed and it is recomputed later (its full blocks usually come back as
prefix-cache hits). Sequences whose prompt KV came from a prefill worker (`reserved`) grow the same
way from their reservation's headroom and are preempted the same way (recomputed here).
With a speculator, a decode may verify several proposed tokens in its step: their slots come from
free blocks only (speculation never preempts), and after verification the blocks taken for
rejected tokens are given back (`rollback`), so only accepted tokens' KV stays and only their
full blocks are ever hashed.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from pdserve.engine.block_hash import chain_block_hashes
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import EngineConfig
from pdserve.engine.sequence import Sequence, SequenceStatus
from pdserve.engine.spec.speculator import Speculator

logger = logging.getLogger(__name__)

PREFILL_SPEED_EMA = 0.25  # weight of the newest step in the measured prefill speed


class PrefillChunkBound:
    """How many prompt tokens a step that also runs decodes may compute: what the measured prefill speed
    does in `chunk_ms`, at least `min_chunk`, at most `budget` (`min_chunk` until a prefill step was
    measured; the whole budget when `chunk_ms` is 0). The engine's scheduler and the planner's simulator
    both use it."""

    def __init__(self, budget: int, chunk_ms: float, min_chunk: int) -> None:
        self.budget, self.chunk_ms, self.min_chunk = budget, chunk_ms, min_chunk
        self.s_per_token: float | None = None  # a moving average over recent steps

    def limit(self) -> int:
        if self.chunk_ms <= 0:
            return self.budget
        if self.s_per_token is None:
            return min(self.budget, self.min_chunk)
        return min(self.budget, max(self.min_chunk, int(self.chunk_ms / 1000.0 / self.s_per_token)))

    def observe(self, num_prompt_tokens: int, seconds: float) -> None:
        """Learn from a finished step: its time per prompt token (decodes in it included: an
        over-estimate, so the bound errs toward shorter steps)."""
        if num_prompt_tokens <= 0 or seconds <= 0:
            return
        sample = seconds / num_prompt_tokens
        prev = self.s_per_token
        self.s_per_token = sample if prev is None else prev + PREFILL_SPEED_EMA * (sample - prev)


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, starting at seq.num_computed_tokens (proposals included)
    spec_token_ids: list[int] = field(default_factory=list)  # proposals verified this step, after the last token
    draft_probs: torch.Tensor | None = None  # [len(spec_token_ids), vocab]: the proposer's distributions
    num_spec_blocks: int = 0  # blocks taken for the proposals' slots, given back if rejected


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, fingerprint: bytes,
                 speculator: Speculator | None = None) -> None:
        self.config = config
        self.bm = block_manager
        self.fingerprint = fingerprint
        self.speculator = speculator
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.chunk_bound = PrefillChunkBound(config.max_num_batched_tokens, config.prefill_chunk_ms,
                                             config.min_prefill_chunk)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def update_block_hashes(self, seq: Sequence) -> None:
        seq.block_hashes = chain_block_hashes(seq.token_ids, self.bm.block_size, self.fingerprint, seq.block_hashes)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill
        scheduled: list[ScheduledSeq] = []
        scheduled_ids: set[str] = set()

        # Decodes first, then unfinished prefills with what is left of the budget: a long prompt's
        # chunk never pushes a running sequence's next token out of the step.
        decodes = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        prefills = [s for s in self.running if s.num_tokens - s.num_computed_tokens != 1]
        for seq in decodes:
            if seq.status is not SequenceStatus.RUNNING or budget <= 0:
                continue
            if not self._ensure_blocks(seq, scheduled_ids):
                continue
            scheduled.append(ScheduledSeq(seq, 1))
            scheduled_ids.add(seq.req_id)
            budget -= 1
        if self.speculator is not None and budget > 0:
            budget -= self._add_proposals([item for item in scheduled if item.seq.status is SequenceStatus.RUNNING],
                                          budget)
        if scheduled:  # sequences are decoding: bound the prompt part of the step by time
            budget = min(budget, self.chunk_bound.limit())
        for seq in prefills:
            if seq.status is not SequenceStatus.RUNNING or budget <= 0:
                continue
            remaining = seq.num_tokens - seq.num_computed_tokens
            if chunked:
                n = min(remaining, budget)
            elif remaining <= budget or not scheduled:
                n = remaining
            else:
                continue
            scheduled.append(ScheduledSeq(seq, n))
            scheduled_ids.add(seq.req_id)
            budget -= n

        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.reserved and seq.block_table:
                n = seq.num_tokens - seq.num_computed_tokens  # KV already in place (decode worker)
            else:
                n = self._admit_blocks(seq, budget, bool(scheduled))
                if n is None:
                    break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, n))
            scheduled_ids.add(seq.req_id)
            budget -= n
        return scheduled

    def _add_proposals(self, items: list[ScheduledSeq], budget: int) -> int:
        """Ask the speculator for proposals for these scheduled decodes and give each the slots its
        proposals need, from free blocks only. Returns the budget used."""
        assert self.speculator is not None
        if not items:
            return 0
        # 0 where speculating is measured slower at this batch size
        limit = self.speculator.plan(len(items), min(len(self.running) + len(self.waiting), self.config.max_num_seqs))
        if limit == 0:
            return 0
        wanted = [(item, self.speculator.num_tokens_for(item.seq, limit)) for item in items if not item.seq.keep_blocks]
        wanted = [(item, k) for item, k in wanted if k > 0]
        if not wanted:
            return 0
        proposals = self.speculator.propose([item.seq for item, _ in wanted], [k for _, k in wanted])
        used = 0
        for (item, _), proposal in zip(wanted, proposals):
            seq = item.seq
            m = min(len(proposal.token_ids), budget - used)
            # the proposals' slots: free blocks only, never a preemption
            extra = self.bm.blocks_for_tokens(seq.num_tokens + m) - len(seq.block_table)
            if extra > self.bm.num_free_blocks:
                extra = self.bm.num_free_blocks
                m = min(m, (len(seq.block_table) + extra) * self.bm.block_size - seq.num_tokens)
            if m <= 0:
                continue
            extra = max(0, self.bm.blocks_for_tokens(seq.num_tokens + m) - len(seq.block_table))
            if extra:
                seq.block_table.extend(self.bm.allocate(extra, after=seq.block_table[-1]))
            item.spec_token_ids = proposal.token_ids[:m]
            item.draft_probs = None if proposal.probs is None else proposal.probs[:m]
            item.num_spec_blocks = extra
            item.num_new_tokens = 1 + m
            used += m
        return used

    def rollback(self, item: ScheduledSeq) -> None:
        """After verification: give back the blocks taken for proposals that were rejected (their slots
        lie past seq.num_computed_tokens and are overwritten by later tokens)."""
        seq = item.seq
        surplus = min(item.num_spec_blocks, len(seq.block_table) - self.bm.blocks_for_tokens(seq.num_tokens))
        if surplus > 0 and not seq.is_finished:
            self.bm.free(seq.block_table[-surplus:])
            del seq.block_table[-surplus:]

    def _admit_blocks(self, seq: Sequence, budget: int, batch_nonempty: bool) -> int | None:
        """Give a waiting sequence its blocks (prefix hits + fresh ones); None if it must wait."""
        bs = self.bm.block_size
        self.update_block_hashes(seq)
        # Never take the block holding the last token from the cache: its logits are needed.
        hashes = seq.block_hashes[: (seq.num_tokens - 1) // bs]
        cached = self.bm.match_prefix(hashes)
        num_new_blocks = self.bm.blocks_for_tokens(seq.num_tokens) - len(cached)
        if self.bm.num_free_after_taking(cached) < num_new_blocks:
            return None
        remaining = seq.num_tokens - len(cached) * bs
        if self.config.enable_chunked_prefill:
            n = min(remaining, budget)
        elif remaining <= budget or not batch_nonempty:
            n = remaining
        else:
            return None
        self.bm.take(cached)
        seq.block_table = cached + self.bm.allocate(num_new_blocks)
        seq.num_computed_tokens = len(cached) * bs
        seq.num_registered_blocks = len(cached)
        self.bm.record_prefix_query(len(hashes), len(cached))
        if not seq.admitted:
            seq.num_cached_tokens = len(cached) * bs
            seq.admitted = True
            seq.first_scheduled_time = time.monotonic()
        return n

    def _ensure_blocks(self, seq: Sequence, scheduled_ids: set[str]) -> bool:
        """Make room for `seq`'s next token, preempting others if needed. False if `seq` itself was preempted."""
        needed = self.bm.blocks_for_tokens(seq.num_tokens) - len(seq.block_table)
        while needed > self.bm.num_free_blocks:
            victim = next((s for s in reversed(self.running)
                           if s is not seq and s.req_id not in scheduled_ids), None)
            if victim is None:
                self.preempt(seq)
                return False
            self.preempt(victim)
        if needed > 0:
            seq.block_table.extend(self.bm.allocate(needed, after=seq.block_table[-1] if seq.block_table else None))
        return True

    def preempt(self, seq: Sequence) -> None:
        logger.debug("preempting %s (free blocks: %d)", seq.req_id, self.bm.num_free_blocks)
        self.running.remove(seq)
        self.bm.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def register_full_blocks(self, seq: Sequence) -> None:
        """Enter every newly computed full block of `seq` into the prefix-cache index."""
        num_full = seq.num_computed_tokens // self.bm.block_size
        if num_full <= seq.num_registered_blocks:
            return
        self.update_block_hashes(seq)
        for i in range(seq.num_registered_blocks, num_full):
            self.bm.register(seq.block_table[i], seq.block_hashes[i])
        seq.num_registered_blocks = num_full

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take `seq` out of the queues; free its blocks unless it holds them for a transfer."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if self.speculator is not None:
            self.speculator.release(seq)
        if not seq.keep_blocks:
            self.release_blocks(seq)

    def release_blocks(self, seq: Sequence) -> None:
        if seq.block_table:
            self.bm.free(seq.block_table)
            seq.block_table = []
