"""Prometheus metrics of workers: the one table turning `pb.WorkerStats` into metric families
(used by each worker's own /metrics and by the router's per-worker view), and the tiny aiohttp
server a worker or KV store process runs to expose its collector. Does not own the router's request
metrics (router/metrics.py) nor the store's families (kvstore/metrics.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pdserve.proto import pdserve_pb2 as pb

logger = logging.getLogger(__name__)

WORKER_LABELS = ["worker", "role"]

# (metric name, WorkerStats field, kind, help). Counters lose their "_total" here: the client adds it.
# Names close to vLLM's where the meaning matches; "worker_" where the router has a request-level twin.
_STATS_METRICS: list[tuple[str, str, str, str]] = [
    ("pdserve:worker_num_requests_running", "num_running", "gauge", "Sequences in the worker's running batch."),
    ("pdserve:worker_num_requests_waiting", "num_waiting", "gauge", "Sequences waiting to be scheduled."),
    ("pdserve:num_kv_blocks", "num_kv_blocks", "gauge", "KV cache blocks in the worker's pool."),
    ("pdserve:num_free_kv_blocks", "num_free_kv_blocks", "gauge", "KV cache blocks free now."),
    ("pdserve:num_reserved_kv_blocks", "num_reserved_blocks", "gauge",
     "KV blocks held by reservations whose KV has not landed yet (decode)."),
    ("pdserve:prefix_cache_queries", "prefix_cache_queries", "counter", "Prefix cache lookups, in blocks."),
    ("pdserve:prefix_cache_hits", "prefix_cache_hits", "counter", "Prefix cache hits, in blocks."),
    ("pdserve:worker_prompt_tokens_computed", "num_prompt_tokens_computed", "counter",
     "Prompt tokens the worker computed (cache hits excluded)."),
    ("pdserve:worker_generation_tokens", "num_generation_tokens", "counter", "Tokens the worker generated."),
    ("pdserve:num_preemptions", "num_preemptions", "counter", "Sequences preempted for lack of KV blocks."),
    ("pdserve:local_prefills", "num_local_prefills", "counter", "Prompts prefilled on this decode/colocated worker."),
    ("pdserve:remote_prefills", "num_remote_prefills", "counter", "Prompts whose KV arrived from a prefill worker."),
    ("pdserve:kv_transfer_bytes_sent", "kv_bytes_sent", "counter", "KV bytes pushed to other workers."),
    ("pdserve:kv_transfer_bytes_received", "kv_bytes_received", "counter", "KV bytes received from other workers."),
    ("pdserve:kv_transfer_failures", "num_transfers_failed", "counter", "KV transfers that failed or timed out."),
    ("pdserve:expired_reservations", "num_expired_reservations", "counter",
     "Reservations freed by their deadline (decode)."),
    ("pdserve:store_hit_tokens", "store_hit_tokens", "counter", "Prompt tokens loaded from the KV store."),
    ("pdserve:store_generated_blocks", "store_generated_blocks", "counter",
     "Generated blocks decode handed to the KV store as they filled (a failover resumes from them)."),
    ("pdserve:store_generated_blocks_dropped", "store_generated_blocks_dropped", "counter",
     "Generated blocks decode did not publish: its publish queue or staging was full."),
    ("pdserve:store_publish_holds", "store_publish_holds", "counter",
     "Stream messages decode held until the request's newly full blocks were in the KV store."),
    ("pdserve:store_publish_hold_seconds", "store_publish_hold_seconds", "counter",
     "Time decode held stream messages for the KV store (summed over held messages)."),
    ("pdserve:store_publish_hold_timeouts", "store_publish_hold_timeouts", "counter",
     "Holds that gave up at --store-publish-hold-ms (a failover then may recompute more than a block)."),
    ("pdserve:spec_decode_num_drafts", "spec_num_drafts", "counter",
     "Speculative decode steps that verified at least one proposed token."),
    ("pdserve:spec_decode_num_draft_tokens", "spec_num_draft_tokens", "counter",
     "Tokens proposed for speculative decoding (n-gram or draft model)."),
    ("pdserve:spec_decode_num_accepted_tokens", "spec_num_accepted_tokens", "counter",
     "Proposed tokens the target model accepted."),
]

# kvstore TransferStats attribute -> direction label of pdserve:kv_transfer_seconds_total.
_AGENT_SECONDS = {"seconds_sending": "sent", "seconds_receiving": "received"}


def worker_stats_families(workers: Iterable[tuple[list[str], pb.WorkerStats]]) -> list[Metric]:
    """Metric families for `(label values [worker, role], stats)` pairs, one sample per worker."""
    families: list[Metric] = [
        (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, help_text, labels=WORKER_LABELS)
        for name, _, kind, help_text in _STATS_METRICS]
    usage = GaugeMetricFamily("pdserve:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).",
                              labels=WORKER_LABELS)
    accept_len = GaugeMetricFamily(
        "pdserve:spec_decode_mean_acceptance_length",
        "Tokens emitted per speculative step since start: 1 + accepted proposals per draft (1: none accepted).",
        labels=WORKER_LABELS)
    for labels, stats in workers:
        for family, (_, field_name, _, _) in zip(families, _STATS_METRICS):
            family.add_metric(labels, float(getattr(stats, field_name)))
        if stats.num_kv_blocks:
            usage.add_metric(labels, 1.0 - stats.num_free_kv_blocks / stats.num_kv_blocks)
        if stats.spec_num_drafts:
            accept_len.add_metric(labels, 1.0 + stats.spec_num_accepted_tokens / stats.spec_num_drafts)
    return [*families, usage, accept_len]


class WorkerCollector:
    """Reads the worker's stats at scrape time (nothing is cached between scrapes)."""

    def __init__(self, stats_fn: Callable[[], pb.WorkerStats], agent_stats_fn: Callable[[], Any]) -> None:
        self.stats_fn = stats_fn
        self.agent_stats_fn = agent_stats_fn

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.stats_fn()
        except Exception:  # noqa: BLE001 - a scrape during startup/shutdown must not crash the server
            logger.debug("worker stats unavailable for /metrics", exc_info=True)
            return
        labels = [stats.worker_id, pb.WorkerRole.Name(stats.role).lower()]
        yield from worker_stats_families([(labels, stats)])
        agent_stats = self.agent_stats_fn()
        seconds = CounterMetricFamily("pdserve:kv_transfer_seconds", "Seconds spent in KV transfers, by direction.",
                                      labels=[*WORKER_LABELS, "direction"])
        for attr, direction in _AGENT_SECONDS.items():
            value = getattr(agent_stats, attr, None)
            if value is not None:
                seconds.add_metric([*labels, direction], float(value))
        yield seconds


def metrics_response(registry: CollectorRegistry) -> web.Response:
    """The Prometheus text exposition of `registry` as an aiohttp response."""
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


class MetricsServer:
    """GET /metrics on its own port, for a worker or store process (the router serves /metrics on
    its HTTP port). `collector` is any prometheus_client collector: an object with `collect()`."""

    def __init__(self, host: str, port: int, collector: Any, what: str = "worker") -> None:
        self.host = host
        self.port = port
        self.what = what
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _metrics(self, request: web.Request) -> web.Response:
        return metrics_response(self.registry)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, shutdown_timeout=1.0)
        await site.start()
        port = self._runner.addresses[0][1]  # the real one when port is 0
        self.url = f"http://{self.host}:{port}/metrics"
        logger.info("%s metrics on %s", self.what, self.url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
