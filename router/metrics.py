"""The router's Prometheus metrics: request latencies and counts (observed around every
Dispatcher.generate, so gRPC and HTTP traffic both count), and a per-worker view of the
registry's polled WorkerStats. Each RouterApp owns its own CollectorRegistry.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import Overloaded
from pdserve.metrics_server import worker_stats_families
from pdserve.router.dispatch import PHASES, Dispatcher, Event
from pdserve.router.registry import WorkerRegistry

# Buckets as vLLM's (seconds).
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                  40.0, 80.0)
E2E_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                 480.0, 960.0, 1920.0, 7680.0)
RECOMPUTE_BUCKETS_TOKENS = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 16384, 65536)
FINISH_REASONS = ("stop", "length", "abort")
HTTP_STATUSES = ("200", "400", "429", "503")  # the ones an operator's panels show from the start


class _WorkerViewCollector:
    """Per-worker families from the registry's last poll, plus the dispatcher's route counts."""

    def __init__(self, registry: WorkerRegistry, dispatcher: Dispatcher) -> None:
        self.registry = registry
        self.dispatcher = dispatcher

    def collect(self) -> Iterator[Metric]:
        workers = list(self.registry.workers.values())
        yield from worker_stats_families(
            ([w.worker_id or w.address, w.role_name], w.stats) for w in workers if w.stats.num_kv_blocks)
        healthy = GaugeMetricFamily("pdserve:worker_healthy", "1 if the router routes to this worker.",
                                    labels=["worker", "role"])
        for w in workers:
            healthy.add_metric([w.worker_id or w.address, w.role_name], 1.0 if w.healthy else 0.0)
        yield healthy
        prefill = GaugeMetricFamily("pdserve:router_worker_prefill_seconds_per_token",
                                    "Prefill seconds per computed prompt token the router learnt for this worker "
                                    "from the step times it reports.", labels=["worker", "role"])
        decode = GaugeMetricFamily("pdserve:router_worker_decode_step_seconds",
                                   "Decode step seconds for a batch of one the router learnt for this worker from "
                                   "the step times it reports.", labels=["worker", "role"])
        for w in workers:
            if w.speed.prefill_s_per_token is not None:
                prefill.add_metric([w.worker_id or w.address, w.role_name], w.speed.prefill_s_per_token)
            if w.speed.has_decode():
                decode.add_metric([w.worker_id or w.address, w.role_name], w.speed.decode_step_s(1))
        yield prefill
        yield decode
        routes = CounterMetricFamily("pdserve:router_prefills", "Requests by where their prompt was prefilled.",
                                     labels=["where"])
        routes.add_metric(["remote"], self.dispatcher.policy.num_remote_prefills)
        routes.add_metric(["local"], self.dispatcher.policy.num_local_prefills)
        yield routes
        yield CounterMetricFamily("pdserve:router_kv_bytes_moved",
                                  "KV bytes prefill workers pushed to decode workers for this router's requests.",
                                  value=self.dispatcher.kv_bytes_moved)
        yield CounterMetricFamily("pdserve:router_retries", "Requests retried on another worker after a failure.",
                                  value=self.dispatcher.num_retries)


class _PlannerCollector:
    """The planner's decisions (by action), the split it sees and its latest prediction."""

    def __init__(self, planner) -> None:
        self.planner = planner

    def collect(self) -> Iterator[Metric]:
        p = self.planner
        decisions = CounterMetricFamily("pdserve:planner_decisions", "Planner decisions by action (hold, switch, "
                                        "switched, unreachable, switch_failed, scale_up, scale_down).",
                                        labels=["action"])
        for action in ("hold", "switch", "switched", "unreachable", "switch_failed", "scale_up", "scale_down"):
            decisions.add_metric([action], p.num_decisions.get(action, 0))
        yield decisions
        split = GaugeMetricFamily("pdserve:planner_split_workers", "Workers per role the planner sees now.",
                                  labels=["role"])
        now = p.current_split()
        for role, n in (("prefill", now.num_prefill), ("decode", now.num_decode), ("colocated", now.num_colocated)):
            split.add_metric([role], n)
        yield split
        snap = p.last_snapshot
        yield GaugeMetricFamily("pdserve:planner_arrival_rate", "Requests/s the planner saw over its window.",
                                value=snap.arrival_rate if snap else 0.0)


class RouterMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, m = self.registry, ["model_name"]
        self.ttft_s = Histogram("pdserve:time_to_first_token_seconds", "Time to first token, router view.", m,
                                registry=r, buckets=TTFT_BUCKETS_S).labels(model_name)
        self.tpot_s = Histogram("pdserve:time_per_output_token_seconds",
                                "Mean time per output token after the first, one sample per request.", m,
                                registry=r, buckets=TPOT_BUCKETS_S).labels(model_name)
        self.e2e_s = Histogram("pdserve:e2e_request_latency_seconds", "End-to-end request latency.", m, registry=r,
                               buckets=E2E_BUCKETS_S).labels(model_name)
        self._success = Counter("pdserve:request_success", "Finished requests by finish reason.",
                                [*m, "finished_reason"], registry=r)
        self._errors = Counter("pdserve:request_errors", "Requests that failed, by error type.", [*m, "error"],
                               registry=r)
        self.rejected = Counter("pdserve:admission_rejections", "Requests refused for lack of capacity (429).", m,
                                registry=r).labels(model_name)
        self.prompt_tokens = Counter("pdserve:prompt_tokens", "Prompt tokens of finished requests.", m,
                                     registry=r).labels(model_name)
        self.cached_prompt_tokens = Counter("pdserve:prompt_tokens_cached",
                                            "Prompt tokens served from a prefix cache or the KV store.", m,
                                            registry=r).labels(model_name)
        self.generation_tokens = Counter("pdserve:generation_tokens", "Generated tokens.", m,
                                         registry=r).labels(model_name)
        self.running = Gauge("pdserve:num_requests_running", "Requests in flight through the router.", m,
                             registry=r).labels(model_name)
        self.http_requests = Counter("pdserve:http_requests", "HTTP requests by route and status.",
                                     ["path", "status"], registry=r)
        self.phase_s = Histogram("pdserve:request_phase_seconds",
                                 "Time a finished request spent in each phase (router, reserve, prefill_queue, "
                                 "prefill_compute, kv_transfer_tail, decode_admission, decode); the phases of a "
                                 "request add up to its end-to-end latency.", [*m, "phase"], registry=r,
                                 buckets=TTFT_BUCKETS_S)
        self.failover_recomputed_tokens = Histogram(
            "pdserve:failover_recomputed_tokens", "Tokens of prompt + streamed output computed again when a stream "
            "moved to another worker after its decode worker failed mid-stream (the rest was loaded from a prefix "
            "cache or the KV store), one sample per failover.", m, registry=r,
            buckets=RECOMPUTE_BUCKETS_TOKENS).labels(model_name)
        self._phases = {name: self.phase_s.labels(model_name, name.removesuffix("_s")) for name in PHASES}
        self.model_name = model_name
        # Children made now, at 0: a series born at its first increment loses that increment to rate().
        for reason in FINISH_REASONS:
            self._success.labels(model_name, reason)

    def watch_workers(self, registry: WorkerRegistry, dispatcher: Dispatcher) -> None:
        self.registry.register(_WorkerViewCollector(registry, dispatcher))

    def watch_planner(self, planner) -> None:
        self.registry.register(_PlannerCollector(planner))

    async def track(self, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        """Pass `events` through, observing latencies and counts; closing this closes `events`."""
        start = time.monotonic()
        first_token_at: float | None = None
        num_tokens = 0
        finish_reason = "abort"  # left early (client gone, cancelled) unless a finish reason arrives
        self.running.inc()
        try:
            async for ev in events:
                if ev.token_ids:
                    if first_token_at is None:
                        first_token_at = time.monotonic()
                        self.ttft_s.observe(first_token_at - start)
                    num_tokens += len(ev.token_ids)
                    self.generation_tokens.inc(len(ev.token_ids))
                if ev.finish_reason:
                    finish_reason = ev.finish_reason
                    if ev.timing is not None:
                        for name, histogram in self._phases.items():
                            histogram.observe(getattr(ev.timing, name))
                    if ev.usage is not None:
                        self.prompt_tokens.inc(ev.usage.prompt_tokens)
                        self.cached_prompt_tokens.inc(ev.usage.cached_tokens)
                yield ev
        except Overloaded:
            finish_reason = ""
            self.rejected.inc()
            raise
        except Exception as exc:
            finish_reason = ""
            self._errors.labels(self.model_name, type(exc).__name__).inc()
            raise
        finally:
            self.running.dec()
            await events.aclose()  # type: ignore[attr-defined]
            end = time.monotonic()
            if finish_reason:
                self._success.labels(self.model_name, finish_reason).inc()
                self.e2e_s.observe(end - start)
                if first_token_at is not None and num_tokens > 1:
                    self.tpot_s.observe((end - first_token_at) / (num_tokens - 1))


class MeteredDispatcher(Dispatcher):
    """The Dispatcher with every generate() observed by RouterMetrics (both front ends use it)."""

    def __init__(self, *args, metrics: RouterMetrics, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.metrics = metrics

    def generate(self, prompt_ids: list[int], params: SamplingParams, **kwargs) -> AsyncIterator[Event]:
        return self.metrics.track(super().generate(prompt_ids, params, **kwargs))

    def observe_failover(self, req_id: str, num_recomputed_tokens: int) -> None:
        super().observe_failover(req_id, num_recomputed_tokens)
        self.metrics.failover_recomputed_tokens.observe(num_recomputed_tokens)
