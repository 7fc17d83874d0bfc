"""LLMEngine: the runtime both workers drive. `add_request`, `step`, `abort_request`, `generate`.

Not thread-safe: one thread (the worker's engine thread) owns an engine and calls it.
Disaggregation hooks: `add_request(..., keep_blocks=True)` keeps a finished prompt's KV blocks
until `release` (prefill side); `add_prefilled_request` admits a sequence whose KV already sits
in reserved blocks (decode side).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pdserve.engine.block_hash import BlockHash
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import EngineConfig
from pdserve.engine.connector import SchedulerConnector
from pdserve.engine.kv_cache import PagedKVCache
from pdserve.engine.linear import make_linear_factory
from pdserve.engine.loader import model_fingerprint
from pdserve.engine.model_config import ModelConfig
from pdserve.engine.models import BuildOptions, load_model
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.sampler import Sampler
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledSeq, Scheduler
from pdserve.engine.threads import ElasticThreads, StepThreads, available_cpus
from pdserve.engine.sequence import Sequence
from pdserve.engine.spec.speculator import Speculator, build_speculator
from pdserve.engine.step_times import StepTimes
from pdserve.errors import InvalidRequest, NotFound

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request (deltas since the previous output)."""

    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[float] | None
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort"
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    new_text: str = ""


@dataclass(slots=True)
class Completion:
    """A finished request, as returned by `generate`."""

    req_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str
    num_cached_tokens: int
    text: str = ""
    logits: list[torch.Tensor] = field(default_factory=list)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.num_threads = config.num_threads or available_cpus()
        torch.set_num_threads(self.num_threads)
        # --elastic-threads: up to every allowed core while the other processes leave cores idle
        on_cpu = config.device.startswith("cpu")
        self.elastic_threads = (ElasticThreads(self.num_threads, available_cpus(), set_threads=lambda n: None)
                                if config.elastic_threads and on_cpu else None)
        # one thread or all, per kind of step, from measured step times (engine/threads.py)
        self.step_threads = StepThreads() if config.step_threads and on_cpu else None
        self.threads_in_force = self.num_threads
        model_dir = Path(config.model)
        self.model_config = ModelConfig.from_dir(model_dir)
        mc = self.model_config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.fingerprint = model_fingerprint(model_dir)
        dtype = _DTYPES[config.dtype]
        linear = make_linear_factory(config.linear_backend, config.device, dtype)
        # the family module (engine/models/) named by config.json's `architectures`
        self.model = load_model(model_dir, mc, BuildOptions(self.max_model_len, config.attention_backend, linear),
                                dtype=dtype, device=config.device)
        bytes_per_block = mc.kv_bytes_per_token * config.block_size * torch.finfo(dtype).bits // 32
        num_blocks = config.num_kv_blocks or max(1, config.kv_cache_memory_mb * 2**20 // bytes_per_block)
        kv = mc.kv_spec  # what the cache stores per token and layer (K and V, or the MLA latent)
        self.kv_cache = PagedKVCache(mc.num_layers, num_blocks, config.block_size, kv.num_kv_heads, kv.head_dim,
                                     dtype=dtype, device=config.device, num_planes=kv.num_planes)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        speculator = build_speculator(config, mc, num_blocks, self.max_model_len)  # None unless --speculative
        self.scheduler = Scheduler(config, self.block_manager, self.fingerprint, speculator)
        self.connector = SchedulerConnector(self)  # how prefill, decode and the store reach the blocks
        self.runner = ModelRunner(self.model, self.kv_cache)
        self.sampler = Sampler(config.seed)
        self.eos_token_ids = set(mc.eos_token_ids)
        self.requests: dict[str, Sequence] = {}  # req_id -> live sequence
        self.num_prompt_tokens_computed = 0  # prompt tokens run through the model (not cache hits)
        self.num_generation_tokens = 0
        self.step_times = StepTimes()  # measured step seconds by kind: routers learn this worker's speed from them
        self.capture_logits = False  # tests: keep each step's logits on the sequence
        # Called as hook(layer_index, batch) once a layer's K/V for the step are in the cache
        # (prefill workers push KV from here while later layers still compute).
        self.layer_hook: Callable[[int, list[ScheduledSeq]], None] | None = None
        # Called as hook(seq, first) right after a step made blocks seq.block_table[first:seq.num_registered_blocks]
        # full: every token's KV in them is final (computed, and accepted where tokens are speculated), and the
        # blocks are still the sequence's (decode publishes its generated blocks to the store from here).
        self.full_block_hook: Callable[[Sequence, int], None] | None = None
        self._logits: dict[str, list[torch.Tensor]] = {}
        logger.info("engine ready: %s, %d layers, %d KV blocks x %d tokens (%.0f MiB), max_model_len %d, "
                    "%s thread(s), attention %s, linear %s", mc.architecture, mc.num_layers, num_blocks,
                    config.block_size, self.kv_cache.nbytes / 2**20, self.max_model_len,
                    f"{self.num_threads}-{self.elastic_threads.ceiling} (elastic)"
                    if self.elastic_threads and self.elastic_threads.ceiling > self.num_threads else self.num_threads,
                    self.model.attention_name, getattr(linear, "kind", "torch"))

    # ---- requests ---------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest when the request can never run on this engine."""
        if not prompt_token_ids:
            raise InvalidRequest("prompt is empty: give at least one token")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        total = len(prompt_token_ids) + params.max_tokens
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequest(
                f"prompt has {len(prompt_token_ids)} tokens; this model's maximum context is {self.max_model_len} "
                "(prompt + at least one generated token): shorten the prompt")
        if total > self.max_model_len:
            raise InvalidRequest(
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                f"the maximum context of {self.max_model_len}: lower max_tokens to at most "
                f"{self.max_model_len - len(prompt_token_ids)}")
        if self.block_manager.blocks_for_tokens(total) > self.block_manager.num_blocks:
            raise InvalidRequest(
                f"request needs {self.block_manager.blocks_for_tokens(total)} KV blocks but the whole cache has "
                f"{self.block_manager.num_blocks}: shorten the prompt or max_tokens")

    def add_request(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                    keep_blocks: bool = False, block_hashes: list[BlockHash] | None = None) -> Sequence:
        """`block_hashes`: the prompt's chained block hashes when the caller already has them (checked by
        connector.check_block_hashes), so the scheduler does not hash the prompt again."""
        if req_id in self.requests:
            raise InvalidRequest(f"request id {req_id!r} is already in use")
        self.validate(prompt_token_ids, params)
        seq = Sequence(req_id, prompt_token_ids, params)
        seq.keep_blocks = keep_blocks
        seq.block_hashes = list(block_hashes or [])
        self.requests[req_id] = seq
        self.scheduler.add(seq)
        return seq

    def add_prefilled_request(self, req_id: str, prompt_token_ids: list[int], first_token_id: int,
                              params: SamplingParams, block_ids: list[int],
                              first_logprob: float | None = None, num_cached_tokens: int = 0,
                              block_hashes: list[BlockHash] | None = None) -> Sequence:
        """Admit a sequence whose prompt KV already sits in `block_ids` (granted by connector.reserve:
        the prompt's blocks plus headroom; it takes more as it generates) and whose first token was
        sampled elsewhere."""
        if req_id in self.requests:
            raise InvalidRequest(f"request id {req_id!r} is already in use")
        seq = Sequence(req_id, prompt_token_ids, params)
        seq.block_hashes = list(block_hashes or [])
        seq.reserved = True
        seq.admitted = True
        seq.block_table = list(block_ids)
        seq.num_computed_tokens = len(prompt_token_ids)
        seq.num_cached_tokens = num_cached_tokens
        seq.first_token_time = time.monotonic()
        self.requests[req_id] = seq
        seq.token_ids.append(first_token_id)
        if first_logprob is not None:
            seq.output_logprobs.append(first_logprob)
        self.scheduler.register_full_blocks(seq)
        if not self._check_stop(seq, first_token_id):
            self.scheduler.add(seq)
        return seq

    def abort_request(self, req_id: str) -> bool:
        """Finish a request now and free its blocks (unless held for a transfer). False if unknown."""
        seq = self.requests.pop(req_id, None)
        if seq is None:
            return False
        seq.keep_blocks = False
        self.scheduler.finish(seq, "abort")
        self._logits.pop(req_id, None)
        return True

    def release(self, req_id: str) -> None:
        """Free the blocks a finished `keep_blocks` request still holds."""
        seq = self.requests.pop(req_id, None)
        if seq is None:
            raise NotFound(f"unknown request {req_id!r}")
        seq.keep_blocks = False
        if seq.is_finished:
            self.scheduler.release_blocks(seq)
        else:
            self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- stepping ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch:
            return []
        threads, kind = self._threads_for(batch)
        num_prompt_tokens = num_decodes = 0
        hook = self.layer_hook
        on_layer_done = None if hook is None else (lambda i: hook(i, batch))
        logits, num_rows = self.runner.execute(batch, on_layer_done)
        emitted = self.sampler.sample_step(batch, logits, num_rows, self.scheduler.speculator)
        outputs = []
        now = time.monotonic()
        row = 0
        for item, n_rows, (tokens, lps) in zip(batch, num_rows, emitted):
            seq = item.seq
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                num_prompt_tokens += min(item.num_new_tokens, seq.num_prompt_tokens - seq.num_computed_tokens)
            else:
                num_decodes += 1
            # the KV of rejected proposals stays in slots past num_computed_tokens, overwritten later
            num_accepted = max(0, len(tokens) - 1)
            reason = None
            for k, token in enumerate(tokens):
                seq.token_ids.append(token)
                if (reason := self._stop_reason(seq, token)) is not None:
                    tokens, num_accepted = tokens[:k + 1], min(num_accepted, k + 1)
                    lps = None if lps is None else lps[:k + 1]
                    break
            if self.capture_logits and tokens:
                assert logits is not None
                self._logits.setdefault(seq.req_id, []).extend(r.clone() for r in logits[row:row + len(tokens)])
            row += n_rows
            seq.num_computed_tokens += item.num_new_tokens - len(item.spec_token_ids) + num_accepted
            num_full_before = seq.num_registered_blocks
            self.scheduler.register_full_blocks(seq)  # accepted tokens only: their KV is final
            if self.full_block_hook is not None and seq.num_registered_blocks > num_full_before:
                self.full_block_hook(seq, num_full_before)
            if not tokens:
                continue
            self.num_generation_tokens += len(tokens)
            if lps is not None:
                seq.output_logprobs.extend(lps)
            if seq.first_token_time is None:
                seq.first_token_time = now
            if reason is not None:
                self.finish(seq, reason)
            elif item.num_spec_blocks:
                self.scheduler.rollback(item)
            outputs.append(RequestOutput(
                req_id=seq.req_id, new_token_ids=tokens, new_logprobs=lps, finished=reason is not None,
                finish_reason=seq.finish_reason, num_prompt_tokens=seq.num_prompt_tokens,
                num_cached_tokens=seq.num_cached_tokens, num_output_tokens=seq.num_output_tokens))
        self.num_prompt_tokens_computed += num_prompt_tokens
        if self.scheduler.speculator is not None:  # its cost control learns from the step's time
            self.scheduler.speculator.end_step(num_prompt_tokens, sum(len(o.new_token_ids) for o in outputs))
        seconds = time.perf_counter() - started
        self.step_times.record(num_prompt_tokens, num_decodes, seconds)
        if kind is not None:
            self.step_threads.observe(kind, threads, seconds)
        self.scheduler.chunk_bound.observe(num_prompt_tokens, seconds)
        return outputs

    def _threads_for(self, batch: list[ScheduledSeq]) -> tuple[int, tuple[bool, int] | None]:
        """Set the forward pass's thread count for this step: the elastic share (else --num-threads), or one
        thread where the step threads' measurements say this kind of step runs faster on one."""
        threads = self.elastic_threads.update() if self.elastic_threads is not None else self.num_threads
        kind = None
        if self.step_threads is not None and threads > 1:
            kind = StepThreads.kind(any(it.seq.num_computed_tokens < it.seq.num_prompt_tokens for it in batch),
                                    sum(it.num_new_tokens for it in batch))
            threads = self.step_threads.choose(kind, threads)
        if threads != self.threads_in_force:
            torch.set_num_threads(threads)
            self.threads_in_force = threads
        return threads, kind

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        """Why `seq` stops after its newest token `token` (already appended), or None."""
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens and (
                token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)):
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _check_stop(self, seq: Sequence, token: int) -> bool:
        reason = self._stop_reason(seq, token)
        if reason is None:
            return False
        self.finish(seq, reason)
        return True

    def finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        if not seq.keep_blocks:
            self.requests.pop(seq.req_id, None)

    # ---- offline ----------------------------------------------------------------------------
    def generate(self, prompts: Iterable[list[int]], params: SamplingParams | list[SamplingParams]
                 ) -> list[Completion]:
        """Run prompts to completion (offline batch). Returns completions in prompt order."""
        prompts = list(prompts)
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        seqs = {rid: self.add_request(rid, p, sp) for rid, p, sp in zip(ids, prompts, params_list)}
        while any(not s.is_finished for s in seqs.values()):
            self.step()
        return [
            Completion(req_id=rid, prompt_token_ids=s.token_ids[:s.num_prompt_tokens],
                       token_ids=s.output_token_ids,
                       logprobs=s.output_logprobs if s.params.logprobs else None,
                       finish_reason=s.finish_reason or "", num_cached_tokens=s.num_cached_tokens,
                       logits=self._logits.pop(rid, []))
            for rid, s in seqs.items()
        ]

    # ---- stats ------------------------------------------------------------------------------
    def stats(self) -> dict[str, int | float]:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_kv_blocks": bm.num_blocks,
            "num_free_kv_blocks": bm.num_free_blocks,
            "num_used_kv_blocks": bm.num_used_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": bm.num_prefix_queries,
            "prefix_cache_hits": bm.num_prefix_hits,
            "num_prompt_tokens_computed": self.num_prompt_tokens_computed,
            "num_generation_tokens": self.num_generation_tokens,
            **self.step_times.as_dict(),
            **(self.scheduler.speculator.stats() if self.scheduler.speculator else Speculator.empty_stats()),
        }
