"""RoutingPolicy: where a request goes. Chooses the decode worker, whether the prompt is prefilled
locally on it or remotely (conditional disaggregation, with the overflow rule), and which prefill
worker; predicts TTFT for admission. Each worker's speed (prefill seconds per token, decode step seconds) is
what the worker measured (`worker.speed`, router/worker_speed.py, fed by the registry's polls): a worker half
as fast gets about half the prefill and decode load.

It decides only: no connections, no RPCs, no retries (those are router/dispatch.py's). The router,
the planner and the simulator (`pdserve simulate`) all call this same object, with the registry's
`Worker`s or simulated workers that have the same attributes (`WorkerView`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pdserve.engine.block_hash import BlockHash
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.config import RouterConfig
from pdserve.router.kv_index import PrefillChoice, PrefixIndex, estimate
from pdserve.router.worker_speed import WorkerSpeed

DEFAULT_S_PER_TOKEN = 1e-4  # prior before any prefill was measured (seconds per computed prompt token)
EWMA_WEIGHT = 0.2  # weight of each measured prefill in the cluster-wide prior
# decode choice: seconds of prompts queued for local prefill on a worker that weigh as much as a full batch
# (load 1.0): a worker that is mostly decoding takes a new prompt before one whose queue would hold it for
# seconds (after a planner makes a prefill worker colocated, it has no sequences and every arrival went to it)
BACKLOG_S_PER_LOAD = 2.0


class WorkerView(Protocol):
    """What the policy reads (and, for its queue counts, writes) of a worker."""

    address: str
    worker_id: str
    role: int
    healthy: bool
    draining: bool  # switching role: routed nothing new
    inflight: int  # requests routed here and not finished
    queued_prompt_tokens: int  # prompt tokens routed here for prefill and not yet answered
    stats: pb.WorkerStats
    speed: WorkerSpeed  # learnt from the step times the worker reports

    def load(self) -> float: ...


def worker_load(stats: pb.WorkerStats, inflight: int) -> float:
    """Lower is better: batch occupancy (running, waiting and routed-but-unfinished requests over the batch
    size) plus KV occupancy."""
    seqs = (stats.num_running + stats.num_waiting + inflight) / max(1, stats.max_num_seqs or 64)
    kv = 1.0 - (stats.num_free_kv_blocks / stats.num_kv_blocks if stats.num_kv_blocks else 1.0)
    return seqs + kv


def routable(worker: WorkerView) -> bool:
    return worker.healthy and not worker.draining


def prefill_locally(config: RouterConfig, num_prompt_tokens: int, decode_inflight: int,
                    prefill_queued_tokens: int | None = None, decode_queued_tokens: int | None = None) -> bool:
    """Conditional disaggregation: whether a prompt is prefilled on its decode worker.

    Short prompts (< local_prefill_threshold) are, while the decode worker is not busy (fewer than
    local_prefill_max_inflight requests): it saves the extra hops. On a busy one a local prefill would
    stall every running sequence, so they go to a prefill worker, unless that worker's queue is already
    longer than remote_prefill_max_queue_tokens (`prefill_queued_tokens`, None before a prefill worker
    is chosen). Past that same limit a prompt of any length overflows to the decode worker when the
    decode worker's own queue of local prefills (`decode_queued_tokens`) is shorter than the prefill
    worker's: a saturated prefill pool then shares prefill with decode instead of letting TTFT grow
    without bound. local_prefill_threshold 0 turns all of it off. With no prefill worker up,
    everything is local anyway."""
    c = config
    if c.local_prefill_threshold <= 0:
        return False  # conditional disaggregation off: never on decode, not even to overflow
    saturated = (prefill_queued_tokens is not None and c.remote_prefill_max_queue_tokens > 0
                 and prefill_queued_tokens > c.remote_prefill_max_queue_tokens)
    if saturated and decode_queued_tokens is not None and decode_queued_tokens < prefill_queued_tokens:
        return True
    if num_prompt_tokens >= c.local_prefill_threshold:
        return False
    if decode_inflight < c.local_prefill_max_inflight:
        return True
    return saturated


@dataclass(slots=True)
class Route:
    """One decision: decode on `decode` (or, if it has no room, `decode_fallbacks` in order), prefill on
    `prefill` (None: on the decode worker itself)."""

    decode: WorkerView
    prefill: WorkerView | None
    reason: str  # why local or remote, for logs
    choice: PrefillChoice | None = None  # the remote prefill's estimate
    decode_fallbacks: list[WorkerView] = field(default_factory=list)
    queued_on: WorkerView | None = None  # whose queue counts the prompt until prefill_done()
    num_prompt_tokens: int = 0

    @property
    def local(self) -> bool:
        return self.prefill is None


class RoutingPolicy:
    def __init__(self, config: RouterConfig, block_size: int) -> None:
        self.config = config
        self.block_size = block_size
        self.prefix_index = PrefixIndex(config.prefix_index_blocks)
        # cluster-wide EWMA over measured prefills: the speed of a worker that has reported no prefill step yet
        self.prefill_s_per_token = DEFAULT_S_PER_TOKEN
        # prompt tokens of admitted requests not yet counted on any worker's queue: a burst that arrives at
        # once is admitted against them, not against queues that are still empty
        self.pending_prefill_tokens = 0
        self.num_local_prefills = 0
        self.num_remote_prefills = 0

    # ---- the decisions --------------------------------------------------------------------------
    def decode_candidates(self, workers: Iterable[WorkerView], excluded: set[str] = frozenset()) -> list[WorkerView]:
        """Healthy decode and colocated workers, least loaded first (ties by address), each worker's load
        weighted by its measured decode step time relative to the fastest candidate's (a worker half as fast
        takes about half the sequences; unmeasured ones count as fast, so they get measured), plus the
        seconds of prompts queued on it for local prefill (at its own speed) over BACKLOG_S_PER_LOAD; draining
        ones only when no other is left (a draining worker still serves: its drain just lasts longer)."""
        healthy = [w for w in workers if w.healthy and w.role in (pb.DECODE, pb.COLOCATED) and w.address not in excluded]
        pool = [w for w in healthy if not w.draining] or healthy
        if not pool:
            return []
        batch = 1 + sum(w.stats.num_running for w in pool) / len(pool)  # compare speeds at the pool's batch
        step_s = {w.address: w.speed.decode_step_s(batch) for w in pool}
        fastest = min((s for s in step_s.values() if s), default=None)

        def key(w: WorkerView) -> tuple[float, str]:
            s = step_s[w.address]
            slowness = s / fastest if s and fastest else 1.0
            backlog_s = w.queued_prompt_tokens * self.s_per_token(w)  # its local prefills not yet answered
            return ((w.load() + 1.0 / max(1, w.stats.max_num_seqs or 64)) * slowness
                    + backlog_s / BACKLOG_S_PER_LOAD, w.address)
        return sorted(pool, key=key)

    def choose_prefill(self, workers: Iterable[WorkerView], num_prompt_tokens: int, hashes: Sequence[BlockHash],
                       stored_blocks: int, excluded: set[str] = frozenset()) -> tuple[WorkerView, PrefillChoice] | None:
        """The healthy prefill worker with the lowest estimated TTFT (cost model: router/kv_index.py), each
        at its own measured speed."""
        best: tuple[float, str, WorkerView, PrefillChoice] | None = None
        for w in workers:
            if not routable(w) or w.role != pb.PREFILL or w.address in excluded:
                continue
            ttft, cached, from_store = estimate(
                num_prompt_tokens, self.block_size, w.queued_prompt_tokens,
                self.prefix_index.match(w.address, list(hashes)), stored_blocks, self.s_per_token(w),
                self.config.store_load_cost)
            if best is None or (ttft, w.address) < best[:2]:
                best = (ttft, w.address, w, PrefillChoice(w.address, ttft, cached, from_store))
        return None if best is None else (best[2], best[3])

    def route(self, workers: Sequence[WorkerView], num_prompt_tokens: int, hashes: Sequence[BlockHash],
              stored_blocks: int = 0, excluded: set[str] = frozenset()) -> Route | None:
        """Where this prompt goes; None when no decode-capable worker is healthy. The prompt is counted
        on the chosen path's queue at once (until prefill_done), so the next decision sees it."""
        decodes = self.decode_candidates(workers, excluded)
        if not decodes:
            return None
        decode = decodes[0]
        route = Route(decode, None, "colocated worker", num_prompt_tokens=num_prompt_tokens,
                      decode_fallbacks=[w for w in decodes[1:] if w.role == pb.DECODE])
        if decode.role == pb.DECODE:
            if prefill_locally(self.config, num_prompt_tokens, decode.inflight):
                route.reason = "short prompt, decode not busy"
            else:
                picked = self.choose_prefill(workers, num_prompt_tokens, hashes, stored_blocks, excluded)
                if picked is None:
                    route.reason = "no healthy prefill worker"
                elif prefill_locally(self.config, num_prompt_tokens, decode.inflight,
                                     picked[0].queued_prompt_tokens, decode.queued_prompt_tokens):
                    route.reason = (f"prefill queue of {picked[0].queued_prompt_tokens} tokens "
                                    f"(decode's: {decode.queued_prompt_tokens}): stays on decode")
                else:
                    route.prefill, route.choice = picked
                    route.reason = "remote prefill"
        if route.prefill is None:
            self.num_local_prefills += 1
            route.queued_on = decode
        else:
            self.num_remote_prefills += 1
            route.queued_on = route.prefill
        route.queued_on.queued_prompt_tokens += num_prompt_tokens
        return route

    def prefill_done(self, route: Route) -> None:
        """The route's prompt has its first token (or failed): it leaves the queue it was counted on."""
        if route.queued_on is not None:
            route.queued_on.queued_prompt_tokens -= route.num_prompt_tokens
            route.queued_on = None

    # ---- admission ------------------------------------------------------------------------------
    def predict_ttft_s(self, workers: Iterable[WorkerView], num_prompt_tokens: int) -> float:
        """Prompt tokens ahead of this one on the quickest prefill path (its queue, plus its share of the
        admitted prompts not yet routed), times that path's measured seconds per token."""
        workers = list(workers)
        paths = [w for w in workers if routable(w) and w.role == pb.PREFILL] or \
            [w for w in workers if routable(w) and w.role in (pb.DECODE, pb.COLOCATED)]
        if not paths:
            return 0.0
        pending_share = self.pending_prefill_tokens / len(paths)
        return min((w.queued_prompt_tokens + pending_share + num_prompt_tokens) * self.s_per_token(w)
                   for w in paths)

    # ---- learning -------------------------------------------------------------------------------
    def s_per_token(self, worker: WorkerView) -> float:
        """The worker's measured prefill seconds per computed token (the cluster-wide prior until it has one)."""
        measured = worker.speed.prefill_s_per_token
        return self.prefill_s_per_token if measured is None else measured

    def observe_prefill(self, num_computed_tokens: int, seconds: float) -> None:
        """A prefill the router saw finish: `num_computed_tokens` computed in `seconds` (the cluster-wide prior;
        each worker's own speed comes from its step counters)."""
        if num_computed_tokens <= 0 or seconds <= 0:
            return
        self.prefill_s_per_token += EWMA_WEIGHT * (seconds / num_computed_tokens - self.prefill_s_per_token)

    def record_prefill(self, address: str, hashes: Sequence[BlockHash], worker_num_blocks: int = 0) -> None:
        """`address` computed (and now probably caches) these blocks."""
        self.prefix_index.record(address, list(hashes), worker_num_blocks)

    def forget_worker(self, address: str) -> None:
        """A worker left or changed role: its cache is no longer what it was (its speed is its own)."""
        self.prefix_index.forget(address)
