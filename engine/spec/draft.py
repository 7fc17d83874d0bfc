"""Draft-model proposer: a smaller model with the target's tokenizer runs k cheap steps per
sequence, in its own paged KV cache, and proposes what it drew (with the distributions it drew
from, for the rejection sampler).

The draft's KV for a sequence is built lazily on the worker that decodes it: the first time a
sequence speculates, the draft prefills its whole context (the prompt, whose target KV may have come
from a prefill worker) in chunks of at most `max_num_batched_tokens` per step, the sequence decoding
plainly until the draft has caught up; afterwards each step feeds it only the tokens accepted since
(docs/speculative.md says why this beats shipping the draft's KV from the prefill worker). Before
each round the draft's cache is cut back to the longest prefix it shares with the sequence, which
drops the KV of its own rejected proposals.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_cache import PagedKVCache
from pdserve.engine.linear import make_linear_factory
from pdserve.engine.model_config import ModelConfig
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.models import BuildOptions, load_model
from pdserve.engine.sampling_params import SEED_STRIDE, SamplingParams
from pdserve.engine.scheduler import ScheduledSeq
from pdserve.engine.sequence import Sequence
from pdserve.engine.spec.proposer import IN_SYNC_TOKENS, Proposal
from pdserve.engine.spec.rejection import target_probs

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DRAFT_SEED_SALT = 0x5BD1E995  # draft draws use a stream apart from the verifier's for the same position


def checkpoint_dtype(model_dir: Path, default: str) -> str:
    """The dtype a checkpoint is stored in (config.json torch_dtype / dtype), else `default`."""
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return default
    value = raw.get("torch_dtype") or raw.get("dtype")
    return value if value in _DTYPES else default


def check_same_tokenizer(draft_dir: Path, draft: ModelConfig, target_dir: Path, target: ModelConfig) -> None:
    """ValueError naming both models when the draft's vocabulary or tokenizer differs from the target's."""
    def tokenizer_vocab(d: Path) -> dict[str, int] | None:
        path = d / "tokenizer.json"
        if not path.is_file():
            return None
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)

    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"draft model {draft_dir} has a vocabulary of {draft.vocab_size} tokens but the model "
                         f"{target_dir} has {target.vocab_size}: the draft must share the model's tokenizer")
    dv, tv = tokenizer_vocab(draft_dir), tokenizer_vocab(target_dir)
    if (dv is None) != (tv is None) or (dv is not None and dv != tv):
        what = "has no tokenizer.json" if dv is None else "has a different tokenizer.json"
        if tv is None:
            what = f"has a tokenizer.json and the model {target_dir} has none"
        raise ValueError(f"draft model {draft_dir} {what} (model: {target_dir}): the draft must share the "
                         "model's tokenizer")


class DraftProposer:
    name = "draft"

    def __init__(self, config: EngineConfig, draft_dir: Path, target_dir: Path, target: ModelConfig,
                 num_blocks: int, max_model_len: int) -> None:
        mc = ModelConfig.from_dir(draft_dir)
        check_same_tokenizer(draft_dir, mc, target_dir, target)
        self.draft_dir = draft_dir
        self.dtype = checkpoint_dtype(draft_dir, config.dtype)
        dtype = _DTYPES[self.dtype]
        linear = make_linear_factory(config.linear_backend, config.device, dtype)
        max_len = min(max_model_len, mc.max_position_embeddings)
        self.model = load_model(draft_dir, mc, BuildOptions(max_len, config.attention_backend, linear),
                                dtype=dtype, device=config.device)
        kv = mc.kv_spec
        self.kv_cache = PagedKVCache(mc.num_layers, num_blocks, config.block_size, kv.num_kv_heads, kv.head_dim,
                                     dtype=dtype, device=config.device, num_planes=kv.num_planes)
        self.bm = BlockManager(num_blocks, config.block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(self.model, self.kv_cache)
        self.chunk_tokens = config.max_num_batched_tokens  # draft catch-up tokens per step, all sequences
        self.generator = torch.Generator().manual_seed(config.seed ^ DRAFT_SEED_SALT)
        self.states: dict[str, Sequence] = {}  # req_id -> the draft's copy (tokens whose KV it holds)
        self.num_tokens_computed = 0  # tokens the draft ran (catch-up prefills and its own proposals)
        self.num_catchup_tokens = 0  # of which catch-up (feeds of more than IN_SYNC_TOKENS)
        logger.info("draft model %s: %s, %d layers, %s, %d KV blocks (%.0f MiB)", draft_dir, mc.architecture,
                    mc.num_layers, self.dtype, num_blocks, self.kv_cache.nbytes / 2**20)

    def lag(self, seq: Sequence) -> int:
        state = self.states.get(seq.req_id)
        return max(0, seq.num_tokens - (state.num_computed_tokens if state is not None else 0))

    def release(self, seq: Sequence) -> None:
        state = self.states.pop(seq.req_id, None)
        if state is not None and state.block_table:
            self.bm.free(state.block_table)

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Proposal]:
        proposals = [Proposal([]) for _ in seqs]
        budget = self.chunk_tokens
        active: list[tuple[int, Sequence, int]] = []  # (index, draft seq, k) of sequences proposing
        batch: list[ScheduledSeq] = []
        for i, (seq, k) in enumerate(zip(seqs, num_tokens)):
            state = self._sync(seq, k)
            if state is None:
                continue
            pending = state.num_tokens - state.num_computed_tokens
            n = min(pending, budget) if pending > 1 else pending
            if n <= 0:
                continue
            budget -= n if pending > 1 else 0  # single-token feeds are not catch-up
            if pending > IN_SYNC_TOKENS:  # a new sequence's context, or many tokens decoded without speculation
                self.num_catchup_tokens += n
            batch.append(ScheduledSeq(state, n))
            if n == pending:
                active.append((i, state, k))
        drawn: dict[int, list[int]] = {i: [] for i, _, _ in active}
        probs: dict[int, list[torch.Tensor]] = {i: [] for i, _, _ in active}
        while batch:
            logits, num_rows = self.runner.execute(batch)
            for item in batch:
                item.seq.num_computed_tokens += item.num_new_tokens
                self.num_tokens_computed += item.num_new_tokens
            row = 0
            next_batch: list[ScheduledSeq] = []
            by_state = {id(s): (i, k) for i, s, k in active}
            for item, n_rows in zip(batch, num_rows):
                if not n_rows:
                    continue
                i, k = by_state[id(item.seq)]
                token, q = self._draw(seqs[i], logits[row], len(drawn[i]))
                row += n_rows
                drawn[i].append(token)
                if q is not None:
                    probs[i].append(q)
                if len(drawn[i]) < k:
                    item.seq.token_ids.append(token)  # its KV is computed in the next round
                    next_batch.append(ScheduledSeq(item.seq, 1))
            batch = next_batch
        for i, tokens in drawn.items():
            proposals[i] = Proposal(tokens, torch.stack(probs[i]) if probs[i] else None)
        return proposals

    def _sync(self, seq: Sequence, k: int) -> Sequence | None:
        """The draft's state for `seq`, cut back to the prefix it shares with it and holding blocks for
        the context plus k - 1 proposals; None when the draft's pool cannot hold it."""
        state = self.states.get(seq.req_id)
        if state is None:
            state = self.states[seq.req_id] = Sequence(seq.req_id, [], seq.params)
        tokens = seq.token_ids
        common = 0
        limit = min(state.num_computed_tokens, len(tokens))
        own = state.token_ids
        while common < limit and own[common] == tokens[common]:
            common += 1
        state.num_computed_tokens = common
        state.token_ids = list(tokens)
        needed = self.bm.blocks_for_tokens(len(tokens) + k - 1)
        if needed > len(state.block_table):
            extra = needed - len(state.block_table)
            if extra > self.bm.num_free_blocks:
                self.release(seq)  # retried from scratch once the pool has room
                return None
            state.block_table.extend(self.bm.allocate(extra, after=state.block_table[-1] if state.block_table else None))
        elif needed < len(state.block_table):
            self.bm.free(state.block_table[needed:])
            del state.block_table[needed:]
        return state

    def _draw(self, seq: Sequence, logits: torch.Tensor, j: int) -> tuple[int, torch.Tensor | None]:
        """Proposal j of `seq`: the draft's argmax for greedy requests, else a draw from its distribution."""
        params: SamplingParams = seq.params
        if params.greedy:
            return int(logits.argmax()), None
        q = target_probs(logits[None], params)[0]
        gen = self.generator
        if params.seed is not None:
            gen = torch.Generator().manual_seed(
                ((params.seed ^ DRAFT_SEED_SALT) + SEED_STRIDE * (seq.num_output_tokens + j)) % 2**63)
        return int(torch.multinomial(q, 1, generator=gen)[0]), q
