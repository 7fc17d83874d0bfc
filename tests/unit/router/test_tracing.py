"""router/tracing.py: a request's hop timeline from its RequestTiming, the bounded buffer behind
/debug/requests, and the OpenTelemetry spans (in-memory exporter: a root per request, a child per phase)."""

from __future__ import annotations

import pytest

from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.tracing import RequestTracer, timeline

TIMING = pb.RequestTiming(router_s=0.002, reserve_s=0.001, prefill_queue_s=0.003, prefill_compute_s=0.05,
                          kv_transfer_tail_s=0.004, decode_admission_s=0.006, decode_s=0.2)


def test_timeline_lays_phases_end_to_end_in_hop_order():
    t = timeline("r1", 100.0, TIMING, "prefill@a", "decode@b", "length")
    names = [s["name"] for s in t["spans"]]
    assert names == ["reserve", "prefill_queue", "prefill_compute", "kv_transfer_tail", "decode_admission",
                     "decode", "router"]
    assert [s["worker"] for s in t["spans"]] == ["decode@b", "prefill@a", "prefill@a", "decode@b", "decode@b",
                                                 "decode@b", "router"]
    for a, b in zip(t["spans"], t["spans"][1:]):
        assert b["start_ms"] == pytest.approx(a["start_ms"] + a["duration_ms"])
    assert t["e2e_ms"] == pytest.approx(266.0) and not t["local_prefill"]


def test_local_prefill_timeline_has_no_remote_hops():
    local = pb.RequestTiming(router_s=0.001, prefill_queue_s=0.001, prefill_compute_s=0.01, decode_s=0.1)
    t = timeline("r2", 0.0, local, "decode@b", "decode@b", "stop")
    assert [s["name"] for s in t["spans"]] == ["prefill_queue", "prefill_compute", "decode", "router"]
    assert t["local_prefill"] and {s["worker"] for s in t["spans"][:3]} == {"decode@b"}


def test_recent_is_bounded_and_spans_are_exported():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracer = RequestTracer(keep=2, span_exporter=exporter)
    for i in range(3):
        tracer.record(f"r{i}", 1000.0 + i, TIMING, "prefill@a", "decode@b", "length")
    assert [t["request_id"] for t in tracer.recent] == ["r1", "r2"]
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.name == "pdserve.request"]
    assert len(roots) == 3 and len(spans) == 3 * 8
    root = roots[0]
    children = [s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id]
    assert {s.name for s in children} == {"reserve", "prefill_queue", "prefill_compute", "kv_transfer_tail",
                                          "decode_admission", "decode", "router"}
    assert all(s.context.trace_id == root.context.trace_id for s in children)
    assert root.attributes["pdserve.request_id"] == "r0"
    assert (root.end_time - root.start_time) == pytest.approx(266e6, rel=1e-6)
    compute = next(s for s in children if s.name == "prefill_compute")
    assert compute.attributes["pdserve.worker"] == "prefill@a" and compute.end_time - compute.start_time == 50_000_000
    tracer.shutdown()
