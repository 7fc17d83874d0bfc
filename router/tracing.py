"""Per-request traces at the router (off by default; `--trace-requests N` turns them on): for each
finished request, a timeline of its hops built from the RequestTiming its workers reported (reserve,
prefill queue and compute, KV transfer tail, decode admission, decode steps, the router's rest). The
last N timelines are served at GET /debug/requests, each is logged on one line, and with
`--otlp-endpoint` each becomes OpenTelemetry spans (a root span per request, a child per phase).

Only the router traces: a worker's phases are spans made here from the durations the worker sent
back, attributed to it (`pdserve.worker`). Durations are measured; positions are laid end to end in
hop order from the request's arrival, with the router's own rest last. Export never blocks a
request: spans go through the SDK's batch processor (dropped when the collector is away).
"""

from __future__ import annotations

import collections
import logging
from typing import Any

from pdserve.proto import pdserve_pb2 as pb

logger = logging.getLogger(__name__)

EXPORT_TIMEOUT_S = 2.0

# (RequestTiming field, span name, who measured it: "router", "prefill" or "decode")
_SPANS = (("reserve_s", "reserve", "decode"), ("prefill_queue_s", "prefill_queue", "prefill"),
          ("prefill_compute_s", "prefill_compute", "prefill"), ("kv_transfer_tail_s", "kv_transfer_tail", "decode"),
          ("decode_admission_s", "decode_admission", "decode"), ("decode_s", "decode", "decode"),
          ("router_s", "router", "router"))


def timeline(req_id: str, started_unix_s: float, timing: pb.RequestTiming, prefill_worker: str, decode_worker: str,
             finish_reason: str) -> dict[str, Any]:
    """One request's spans (ms from its arrival), as GET /debug/requests shows them."""
    workers = {"router": "router", "prefill": prefill_worker or decode_worker, "decode": decode_worker}
    spans, at_ms = [], 0.0
    for field_name, name, who in _SPANS:
        ms = 1e3 * getattr(timing, field_name)
        if ms > 0:
            spans.append({"name": name, "worker": workers[who], "start_ms": round(at_ms, 3), "duration_ms": round(ms, 3)})
            at_ms += ms
    return {"request_id": req_id, "start_unix_s": started_unix_s, "e2e_ms": round(at_ms, 3),
            "finish_reason": finish_reason, "prefill_worker": prefill_worker, "decode_worker": decode_worker,
            "local_prefill": prefill_worker == decode_worker, "spans": spans}


class RequestTracer:
    """Keeps the last `keep` timelines; optionally turns each into OpenTelemetry spans.
    `span_exporter`: an SDK SpanExporter (tests pass an in-memory one); else `otlp_endpoint` builds
    the OTLP gRPC exporter when its package is installed (a warning and no export when it is not)."""

    def __init__(self, keep: int, otlp_endpoint: str = "", span_exporter: Any = None,
                 service_name: str = "pdserve-router") -> None:
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=max(1, keep))
        self._provider = None
        self._tracer = None
        exporter, processor = span_exporter, None
        if exporter is None and otlp_endpoint:
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            except ImportError:
                logger.warning("--otlp-endpoint %s: opentelemetry-exporter-otlp-proto-grpc is not installed; "
                               "request timelines stay at /debug/requests and in the log", otlp_endpoint)
            else:
                # a short deadline: an export (retries included) to a collector that is away gives up soon
                exporter = OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True, timeout=EXPORT_TIMEOUT_S)
        if exporter is not None:
            try:
                from opentelemetry.sdk.resources import Resource
                from opentelemetry.sdk.trace import TracerProvider
                from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
            except ImportError:
                logger.warning("OpenTelemetry export asked for, but opentelemetry-sdk is not installed "
                               "(pip install opentelemetry-sdk); request timelines stay at /debug/requests")
            else:
                # Not the global provider: this one belongs to this router and ends with it.
                self._provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
                processor = SimpleSpanProcessor(exporter) if span_exporter is not None else BatchSpanProcessor(exporter)
                self._provider.add_span_processor(processor)
                self._tracer = self._provider.get_tracer("pdserve.router")

    def record(self, req_id: str, started_unix_s: float, timing: pb.RequestTiming, prefill_worker: str,
               decode_worker: str, finish_reason: str) -> None:
        t = timeline(req_id, started_unix_s, timing, prefill_worker, decode_worker, finish_reason)
        self.recent.append(t)
        logger.info("[%s] %.1f ms: %s", req_id, t["e2e_ms"],
                    ", ".join(f"{s['name']} {s['duration_ms']:.1f} ms ({s['worker']})" for s in t["spans"]))
        if self._tracer is not None:
            self._export(t)

    def _export(self, t: dict[str, Any]) -> None:
        from opentelemetry import trace

        start_ns = int(t["start_unix_s"] * 1e9)
        root = self._tracer.start_span("pdserve.request", start_time=start_ns, attributes={
            "pdserve.request_id": t["request_id"], "pdserve.finish_reason": t["finish_reason"],
            "pdserve.prefill_worker": t["prefill_worker"], "pdserve.decode_worker": t["decode_worker"]})
        context = trace.set_span_in_context(root)
        for s in t["spans"]:
            begin = start_ns + int(s["start_ms"] * 1e6)
            span = self._tracer.start_span(s["name"], context=context, start_time=begin, attributes={
                "pdserve.request_id": t["request_id"], "pdserve.worker": s["worker"]})
            span.end(end_time=begin + int(s["duration_ms"] * 1e6))
        root.end(end_time=start_ns + int(t["e2e_ms"] * 1e6))

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()
