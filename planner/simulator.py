"""The cluster simulator: the real RoutingPolicy (router/policy.py) and the real planner decision
(planner/planner.py SplitChooser) against simulated workers, in simulated time.

A simulated worker is a continuous-batching engine: each step runs every running decode sequence
and as many prefill tokens as the chunk budget leaves (`--max-num-batched-tokens` minus the decodes),
and takes StepModel.step_s(decodes, prefill tokens, context tokens) seconds, the model calibrated on
real workers (planner/calibrate.py), times the served-step factor plus the serving stack's own cost of a
decode step where those were calibrated too. Each worker counts its steps as a real engine does (StepTimes)
and the policy learns every worker's speed from them at the router's poll interval, as the router does.
With `num_cores`, a step slows by the fair share of those cores among the busy workers, the router and
clients (their CPU per streamed token times the token rate) and `outside_runnable` threads of others.
A remote prefill's KV reaches its decode worker after latency + bytes / bandwidth; it joins the decode
batch at its next step. Each worker has an LRU prefix cache of its KV pool's size; a store (optional)
holds every published prompt block. Does not simulate preemption, KV exhaustion or failures.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from pdserve.engine.config import EngineConfig
from pdserve.engine.scheduler import PrefillChunkBound
from pdserve.engine.step_times import StepTimes
from pdserve.planner.config import PlannerConfig
from pdserve.planner.model import Split, StepModel
from pdserve.planner.planner import SplitChooser, assign_roles, measured_speeds, split_of
from pdserve.planner.signals import Arrival, FinishedRequest, SignalWindow
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.config import RouterConfig
from pdserve.router.policy import RoutingPolicy, worker_load
from pdserve.router.worker_speed import WorkerSpeed

logger = logging.getLogger(__name__)

_ENGINE_DEFAULTS = EngineConfig.__dataclass_fields__


@dataclass(frozen=True, slots=True)
class Calibration:
    """What a simulated worker is: step times, chunk budget, KV pool, KV bytes, transfer speed."""

    step: StepModel = field(default_factory=StepModel)
    chunk_tokens: int = _ENGINE_DEFAULTS["max_num_batched_tokens"].default  # the engine's per-step token budget
    # while decodes run, the prompt part of a step is bounded by time (engine/scheduler.py PrefillChunkBound)
    prefill_chunk_ms: float = _ENGINE_DEFAULTS["prefill_chunk_ms"].default
    min_prefill_chunk: int = _ENGINE_DEFAULTS["min_prefill_chunk"].default
    max_num_seqs: int = 64
    num_kv_blocks: int = 4096
    block_size: int = 16
    kv_bytes_per_token: int = 4096
    transfer_bytes_per_s: float = 1e9
    transfer_latency_s: float = 2e-3  # also decode admission of the landed KV
    hop_s: float = 1e-3  # router <-> worker per hop (Reserve, Prefill, Decode)
    # the serving stack around the engine (planner/calibrate.py calibrate_serving; 0: not calibrated):
    # wall seconds a decode step takes beyond its compute (the engine loop, handing tokens to the streams)
    decode_overhead_s: float = 0.0
    decode_overhead_per_seq_s: float = 0.0
    frontend_cpu_s_per_token: float = 0.0  # router + client CPU per streamed token (taken from shared cores)
    serving_step_factor: float = 1.0  # an engine step inside a serving worker over the same step alone
    # a served step's prompt tokens over that factor (1: as the decode part); fitted with the step factor by
    # planner/calibrate.py fit_step_factors on a real configuration's own run (its workers' step counters)
    serving_prefill_factor: float = 1.0
    # a prefill worker's prefill step over a colocated worker's for the same prompt (measured on a real pair:
    # its KV leaves during its steps), and a remote prefill's path beyond its hops
    remote_prefill_step_factor: float = 1.0
    remote_prefill_overhead_s: float = 0.0

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "step"}
        return {**d, "step": {k: getattr(self.step, k) for k in self.step.__dataclass_fields__}}

    @staticmethod
    def from_dict(d: dict) -> "Calibration":
        d = dict(d)
        step = StepModel(**d.pop("step", {}))
        known = {k: v for k, v in d.items() if k in Calibration.__dataclass_fields__}
        return Calibration(step=step, **known)


@dataclass(frozen=True, slots=True)
class SimRequest:
    request_id: str
    arrival_s: float
    prompt_len: int
    output_len: int
    hashes: tuple[bytes, ...]  # the prompt's chained block hashes (full blocks)


@dataclass(slots=True)
class SimSeq:
    req: SimRequest
    route: object = None
    cached_tokens: int = 0
    to_compute: int = 0  # prompt tokens still to compute
    computed_started_s: float = 0.0
    generated: int = 0
    token_times: list = field(default_factory=list)  # first, second, latest
    done: bool = False


@dataclass(slots=True)
class SimWorker:
    """A worker as the RoutingPolicy sees it (router/policy.py WorkerView), plus its engine state."""

    address: str
    role: int
    cal: Calibration
    worker_id: str = ""
    healthy: bool = True
    draining: bool = False
    target_role: int = 0
    inflight: int = 0
    queued_prompt_tokens: int = 0
    stats: pb.WorkerStats = field(default_factory=pb.WorkerStats)
    prefill_queue: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    busy: bool = False
    cache: OrderedDict = field(default_factory=OrderedDict)  # block hash -> None (LRU prefix cache)
    busy_s: float = 0.0
    step_times: StepTimes = field(default_factory=StepTimes)  # what a real worker reports in its stats
    speed: WorkerSpeed = field(default_factory=WorkerSpeed)  # what the router learns from them
    chunk_bound: PrefillChunkBound = field(init=False)  # the engine's prefill bound next to decodes (from cal)

    def __post_init__(self) -> None:
        self.worker_id = self.worker_id or self.address
        self.chunk_bound = PrefillChunkBound(self.cal.chunk_tokens, self.cal.prefill_chunk_ms,
                                             self.cal.min_prefill_chunk)
        self.stats.max_num_seqs = self.cal.max_num_seqs
        self.stats.num_kv_blocks = self.cal.num_kv_blocks

    def load(self) -> float:
        used = sum(-(-(s.req.prompt_len + s.generated) // self.cal.block_size) for s in self.running)
        self.stats.num_running = len(self.running)
        self.stats.num_waiting = len(self.prefill_queue)
        self.stats.num_free_kv_blocks = max(0, self.cal.num_kv_blocks - used)
        return worker_load(self.stats, self.inflight)

    def idle(self) -> bool:
        return not self.prefill_queue and not self.running and self.inflight == 0

    def cached_prefix(self, hashes: tuple[bytes, ...], prompt_len: int) -> int:
        n = 0
        for h in hashes[: (prompt_len - 1) // self.cal.block_size]:
            if h not in self.cache:
                break
            n += 1
        return n

    def remember(self, hashes: tuple[bytes, ...]) -> None:
        for h in hashes:
            self.cache[h] = None
            self.cache.move_to_end(h)
        while len(self.cache) > self.cal.num_kv_blocks:
            self.cache.popitem(last=False)


@dataclass(slots=True)
class SimResult:
    split: str  # the split it started with
    planner: str
    num_requests: int
    num_finished: int
    duration_s: float
    goodput_rps: float
    throughput_rps: float
    ttft_s: dict
    tpot_s: dict
    prefix_hit_ratio: float
    local_prefill_share: float
    kv_bytes_moved: int
    decisions: list = field(default_factory=list)  # (time, action, from, to, reason)
    final_split: str = ""

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def percentiles(values: list[float], ps=(50, 90, 99)) -> dict:
    if not values:
        return {f"p{p}": None for p in ps}
    xs = sorted(values)
    return {f"p{p}": xs[min(len(xs) - 1, max(0, math.ceil(p / 100 * len(xs)) - 1))] for p in ps}


class Simulation:
    def __init__(self, requests: list[SimRequest], split: Split, cal: Calibration, router_config: RouterConfig,
                 planner_config: PlannerConfig | None = None, slo_ttft_s: float | None = None,
                 slo_tpot_s: float | None = None, use_store: bool = True, speed_factors: list[float] | None = None,
                 num_cores: float | None = None, outside_runnable: float = 0.0) -> None:
        # workers sharing `num_cores` CPU cores (None: each has its own) with `outside_runnable` threads of
        # other processes: a step runs slower by runnable threads / cores while there are more than cores
        self.num_cores = num_cores
        self.outside_runnable = outside_runnable
        self.num_busy = 0
        self.num_tokens = 0  # streamed so far
        self.frontend_cores = 0.0  # cores the router and clients take now: token rate x their CPU per token
        self._tokens_at_poll = 0
        self.requests = requests
        self.cal = cal
        self.poll_interval_s = router_config.health_interval_s
        self.policy = RoutingPolicy(router_config, cal.block_size)
        self.planner_config = planner_config or PlannerConfig()
        self.chooser = SplitChooser(self.planner_config)
        self.window = SignalWindow(self.planner_config.planner_window_s, self.planner_config.planner_min_requests)
        self.slo_ttft_s, self.slo_tpot_s = slo_ttft_s, slo_tpot_s
        self.store: set[bytes] | None = set() if use_store else None
        roles = [pb.PREFILL] * split.num_prefill + [pb.DECODE] * split.num_decode + [pb.COLOCATED] * split.num_colocated
        factors = speed_factors or [1.0] * len(roles)
        self.workers = [SimWorker(f"w{i}", role, _scaled(cal, factors[i % len(factors)]))
                        for i, role in enumerate(roles)]
        self.split = split
        self.now = 0.0
        self._events: list = []
        self._seq = itertools.count()
        self.finished: list[SimSeq] = []
        self.lost = 0
        self.kv_bytes_moved = 0
        self.decisions: list = []

    # ---- event queue ------------------------------------------------------------------------------
    def at(self, t: float, fn, *args) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn, args))

    def run(self, max_sim_s: float = 3600.0) -> SimResult:
        for r in self.requests:
            self.at(r.arrival_s, self._arrive, r)
        if self.planner_config.planner != "off":
            self.at(self.planner_config.planner_interval_s, self._plan)
        self.at(0.0, self._poll)
        last_arrival = self.requests[-1].arrival_s if self.requests else 0.0
        while self._events:
            t, _, fn, args = heapq.heappop(self._events)
            if t > max_sim_s:
                break
            self.now = t
            fn(*args)
            if fn == self._plan and self.now > last_arrival and len(self.finished) + self.lost >= len(self.requests):
                break
        return self._result()

    # ---- requests ---------------------------------------------------------------------------------
    def _arrive(self, r: SimRequest) -> None:
        self.window.arrive(Arrival(self.now, r.prompt_len, r.output_len))  # as the router's admission tells the planner
        stored = 0
        if self.store is not None:
            for h in r.hashes:
                if h not in self.store:
                    break
                stored += 1
        route = self.policy.route(self.workers, r.prompt_len, r.hashes, stored)
        if route is None:
            self.lost += 1
            return
        seq = SimSeq(r, route)
        worker = route.decode if route.local else route.prefill
        local_blocks = worker.cached_prefix(r.hashes, r.prompt_len)
        cap = (r.prompt_len - 1) // self.cal.block_size
        seq.cached_tokens = self.cal.block_size * min(cap, max(local_blocks, stored))
        seq.to_compute = r.prompt_len - seq.cached_tokens
        route.decode.inflight += 1
        hops = 1 if route.local else 2  # local: Decode; remote: Reserve + Prefill
        extra = 0.0 if route.local else self.cal.remote_prefill_overhead_s
        self.at(self.now + hops * self.cal.hop_s + extra, self._enqueue, worker, seq)

    def _enqueue(self, worker: SimWorker, seq: SimSeq) -> None:
        seq.computed_started_s = self.now
        worker.prefill_queue.append(seq)
        self._kick(worker)

    def _kick(self, w: SimWorker) -> None:
        if w.busy:
            return
        decodes = w.running[: w.cal.max_num_seqs]
        budget = max(0, w.cal.chunk_tokens - len(decodes))
        if decodes:
            budget = min(budget, w.chunk_bound.limit())
        chunks = []
        for seq in w.prefill_queue:
            if budget <= 0:
                break
            take = min(seq.to_compute, budget)
            chunks.append((seq, take))
            budget -= take
        if not decodes and not chunks:
            self._maybe_switch(w)
            return
        ctx = sum(s.req.prompt_len + s.generated for s in decodes)
        tokens = sum(t for _, t in chunks)
        cal = w.cal
        step_s = (cal.step.step_s(len(decodes), 0, ctx) + cal.step.per_token_s * tokens * cal.serving_prefill_factor
                  ) * cal.serving_step_factor
        if w.role == pb.PREFILL:
            step_s *= w.cal.remote_prefill_step_factor
        if decodes:
            step_s += w.cal.decode_overhead_s + w.cal.decode_overhead_per_seq_s * len(decodes)
        self.num_busy += 1
        if self.num_cores:  # a fair share of the cores among busy workers, the router and clients, and others
            step_s *= max(1.0, (self.num_busy + self.frontend_cores + self.outside_runnable) / self.num_cores)
        w.busy = True
        w.busy_s += step_s
        w.step_times.record(tokens, len(decodes), step_s)
        w.chunk_bound.observe(tokens, step_s)
        self.at(self.now + step_s, self._step_done, w, list(decodes), chunks)

    def _step_done(self, w: SimWorker, decodes: list, chunks: list) -> None:
        w.busy = False
        self.num_busy -= 1
        for seq in decodes:
            if seq.done:
                continue
            self._token(seq)
            if seq.generated >= seq.req.output_len:
                self._finish(w, seq)
        for seq, take in chunks:
            seq.to_compute -= take
            if seq.to_compute > 0:
                continue
            w.prefill_queue.remove(seq)
            self._prefilled(w, seq)
        self._kick(w)

    def _token(self, seq: SimSeq) -> None:
        seq.generated += 1
        self.num_tokens += 1
        t = self.now + self.cal.hop_s  # streamed to the router
        if len(seq.token_times) >= 3:
            seq.token_times[2] = t
        else:
            seq.token_times.append(t)

    def _prefilled(self, w: SimWorker, seq: SimSeq) -> None:
        route = seq.route
        self.policy.prefill_done(route)
        computed = seq.req.prompt_len - seq.cached_tokens
        w.remember(seq.req.hashes)
        if self.store is not None:
            self.store.update(seq.req.hashes)
        self._token(seq)  # the first token
        if route.local:
            if seq.generated >= seq.req.output_len:
                self._finish(w, seq)
            else:
                w.running.append(seq)
            return
        self.policy.observe_prefill(computed, self.now - seq.computed_started_s)
        self.policy.record_prefill(w.address, seq.req.hashes, w.cal.num_kv_blocks)
        nbytes = computed * w.cal.kv_bytes_per_token
        self.kv_bytes_moved += nbytes
        self.at(self.now + w.cal.transfer_latency_s + nbytes / w.cal.transfer_bytes_per_s, self._landed, seq)
        self._maybe_switch(w)

    def _landed(self, seq: SimSeq) -> None:
        d = seq.route.decode
        if seq.generated >= seq.req.output_len:
            self._finish(d, seq)
            return
        d.running.append(seq)
        self._kick(d)

    def _finish(self, w: SimWorker, seq: SimSeq) -> None:
        seq.done = True
        if seq in w.running:
            w.running.remove(seq)
        seq.route.decode.inflight -= 1
        self.finished.append(seq)
        t = seq.token_times
        n = seq.generated
        tpot = (t[-1] - t[0]) / (n - 1) if n > 1 else 0.0
        gaps = (t[-1] - t[1]) / (n - 2) if n > 2 else tpot
        self.window.add(FinishedRequest(
            finished_at=t[-1], prompt_tokens=seq.req.prompt_len, cached_tokens=seq.cached_tokens, output_tokens=n,
            ttft_s=t[0] - seq.req.arrival_s, tpot_s=tpot, gap1_s=(t[1] - t[0]) if n > 1 else 0.0, gaps_s=gaps,
            remote=not seq.route.local, decode_batch=len(w.running)))
        self._maybe_switch(seq.route.decode)

    def _poll(self) -> None:
        """The router's stats poll: every worker's speed learnt from its step counters."""
        for w in self.workers:
            w.speed.observe(w.step_times.copy())
        rate = (self.num_tokens - self._tokens_at_poll) / self.poll_interval_s
        self._tokens_at_poll = self.num_tokens
        self.frontend_cores = rate * self.cal.frontend_cpu_s_per_token
        if len(self.finished) + self.lost < len(self.requests):
            self.at(self.now + self.poll_interval_s, self._poll)

    # ---- the planner ------------------------------------------------------------------------------
    def _plan(self) -> None:
        live = [w for w in self.workers if not w.draining]
        current = split_of(w.role for w in self.workers)
        decode_capable = [w for w in self.workers if w.role in (pb.DECODE, pb.COLOCATED)]
        batch = sum(len(w.running) for w in decode_capable) / max(1, len(decode_capable))
        snap = self.window.snapshot(self.now, self.policy.prefill_s_per_token, self.cal.step, batch,
                                    measured_speeds(self.workers, self.policy),
                                    backlog_tokens=sum(w.queued_prompt_tokens for w in self.workers))
        decision = self.chooser.decide(self.now, current, snap)
        if decision.action == "switch" and len(live) == len(self.workers):
            for w, role in assign_roles(self.workers, decision.target, self.policy.s_per_token):
                if role == pb.COLOCATED:  # widening: no drain (pdserve/worker_roles.py)
                    w.role = role
                    self.decisions.append((round(self.now, 3), "switched", w.address, "colocated", "no drain"))
                    continue
                w.draining, w.target_role = True, role
                self._maybe_switch(w)
            self.chooser.last_change_at = self.now
        if decision.action != "hold" or not self.decisions or self.decisions[-1][1] != "hold":
            self.decisions.append((round(self.now, 3), decision.action, str(decision.current), str(decision.target),
                                   decision.reason))
        self.at(self.now + self.planner_config.planner_interval_s, self._plan)

    def _maybe_switch(self, w: SimWorker) -> None:
        if w.draining and w.idle() and not w.busy:
            w.role, w.draining, w.target_role = w.target_role, False, 0
            self.decisions.append((round(self.now, 3), "switched", w.address, pb.WorkerRole.Name(w.role).lower(), ""))

    # ---- results ----------------------------------------------------------------------------------
    def _result(self) -> SimResult:
        done = self.finished
        ttfts = [s.token_times[0] - s.req.arrival_s for s in done]
        tpots = [(s.token_times[-1] - s.token_times[0]) / (s.generated - 1) for s in done if s.generated > 1]
        start = self.requests[0].arrival_s if self.requests else 0.0
        end = max((s.token_times[-1] for s in done), default=start)
        duration = max(1e-9, end - start)

        def meets(s: SimSeq) -> bool:
            ttft = s.token_times[0] - s.req.arrival_s
            tpot = (s.token_times[-1] - s.token_times[0]) / (s.generated - 1) if s.generated > 1 else 0.0
            return (self.slo_ttft_s is None or ttft <= self.slo_ttft_s) and \
                (self.slo_tpot_s is None or tpot <= self.slo_tpot_s)
        prompt = sum(s.req.prompt_len for s in done)
        local = self.policy.num_local_prefills
        routed = local + self.policy.num_remote_prefills
        return SimResult(
            split=str(self.split), planner=self.planner_config.planner, num_requests=len(self.requests),
            num_finished=len(done), duration_s=duration, goodput_rps=sum(map(meets, done)) / duration,
            throughput_rps=len(done) / duration, ttft_s=percentiles(ttfts), tpot_s=percentiles(tpots),
            prefix_hit_ratio=sum(s.cached_tokens for s in done) / prompt if prompt else 0.0,
            local_prefill_share=local / routed if routed else 0.0, kv_bytes_moved=self.kv_bytes_moved,
            decisions=self.decisions, final_split=str(split_of(w.role for w in self.workers)))


def _scaled(cal: Calibration, factor: float) -> Calibration:
    if factor == 1.0:
        return cal
    d = cal.to_dict()
    d["step"] = {k: v * factor for k, v in d["step"].items()}
    return Calibration.from_dict(d)
