"""The Grafana dashboard: every panel (title, what it tells an operator, PromQL, unit) defined once
here. `python -m pdserve.dashboards` (`make dashboards`) writes the dashboard JSON that compose
provisions, the Kubernetes ConfigMap that carries it, and docs/dashboards.md; a unit test fails when
they are stale, and tests/integration/test_dashboards.py runs every expression on a real Prometheus
scraping a real `pdserve up` cluster.

Queries never filter on job names (they differ between compose, k8s and a hand-made Prometheus).
Per-worker families are exported both by each worker and by the router's per-worker view, and by
every router replica: `max by (worker, role)` counts each worker once whoever was scraped.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DASHBOARD_JSON = REPO / "deploy" / "grafana" / "dashboards" / "pdserve.json"
K8S_CONFIGMAP = REPO / "deploy" / "k8s" / "base" / "grafana-dashboard.yaml"
DOCS = REPO / "docs" / "dashboards.md"

UID = "pdserve-overview"
RATE = "$__rate_interval"
# Template variables: name -> (options, default). An SLO must be a bucket bound of its histogram
# (router/metrics.py), so goodput is read straight from the bucket counts.
VARIABLES = {
    "ttft_slo": (["0.1", "0.25", "0.5", "1.0", "2.5", "5.0"], "0.5"),
    "tpot_slo": (["0.025", "0.05", "0.1", "0.2", "0.5"], "0.1"),
}


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    description: str  # what an operator reads from it; also its line in docs/dashboards.md
    queries: tuple[Query, ...]
    unit: str = "short"
    stack: bool = False


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def _quantiles(metric: str, by: str = "") -> tuple[Query, ...]:
    group = f"le{', ' + by if by else ''}"
    suffix = f" {{{{{by}}}}}" if by else ""
    return tuple(Query(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket[{RATE}])))", f"p{int(q * 100)}{suffix}")
                 for q in (0.5, 0.9, 0.99))


SENT = 'direction="sent"'
WORKERS = 'worker!=""'  # store nodes export some of the same families, labelled by node instead


def _rate(metric: str, selector: str = "") -> str:
    return f"rate({metric}{{{selector}}}[{RATE}])" if selector else f"rate({metric}[{RATE}])"


def _per_worker(expr: str) -> str:
    return f"max by (worker, role) ({expr})"


ROWS: tuple[Row, ...] = (
    Row("Requests (router view: every request, gRPC and HTTP)", (
        Panel("Time to first token", "TTFT percentiles over the rate window, as the router sees them: queueing, "
              "prefill and the first hop back. Compare with the phase breakdown below to see where it went.",
              _quantiles("pdserve:time_to_first_token_seconds"), unit="s"),
        Panel("Time per output token", "TPOT percentiles (one sample per request: its mean gap between tokens "
              "after the first): the decode loop's speed as a user feels it.",
              _quantiles("pdserve:time_per_output_token_seconds"), unit="s"),
        Panel("End-to-end latency", "Request latency percentiles from admission to the last token.",
              _quantiles("pdserve:e2e_request_latency_seconds"), unit="s"),
        Panel("Goodput against SLOs", "Share of finished requests whose TTFT was within $ttft_slo s and, "
              "separately, whose TPOT was within $tpot_slo s (pick the SLOs at the top; each must be a "
              "bucket bound). A drop here with flat throughput means the cluster is saturated.",
              (Query('sum(rate(pdserve:time_to_first_token_seconds_bucket{le="$ttft_slo"}[' + RATE + '])) / '
                     'sum(rate(pdserve:time_to_first_token_seconds_count[' + RATE + ']))', "TTFT <= $ttft_slo s"),
               Query('sum(rate(pdserve:time_per_output_token_seconds_bucket{le="$tpot_slo"}[' + RATE + '])) / '
                     'sum(rate(pdserve:time_per_output_token_seconds_count[' + RATE + ']))',
                     "TPOT <= $tpot_slo s")), unit="percentunit"),
        Panel("Throughput", "Finished requests per second by finish reason, and generated tokens per second.",
              (Query(f"sum by (finished_reason) (rate(pdserve:request_success_total[{RATE}]))",
                     "requests/s {{finished_reason}}"),
               Query(f"sum(rate(pdserve:generation_tokens_total[{RATE}]))", "generated tokens/s"),
               Query(f"sum(rate(pdserve:prompt_tokens_total[{RATE}]))", "prompt tokens/s")), unit="short"),
        Panel("Rejections and errors", "Requests refused for capacity (429: in-flight limit, no KV blocks, "
              "predicted TTFT over --ttft-slo-ms) and HTTP answers by error status (400 bad input, 503 no worker).",
              (Query(f"sum(rate(pdserve:admission_rejections_total[{RATE}]))", "rejected (429)/s"),
               Query(f'sum by (status) (rate(pdserve:http_requests_total{{status=~"4..|5.."}}[{RATE}]))',
                     "HTTP {{status}}/s")), unit="reqps"),
        Panel("Time per phase (mean)", "Where a request's time went, from the per-request timing each worker "
              "reports: router admission, decode reserve, prefill queue, prefill compute, the KV transfer tail "
              "(KV still landing after prefill answered), decode admission and the decode steps. Stacked, the "
              "phases add up to the end-to-end latency.",
              (Query(f"sum by (phase) (rate(pdserve:request_phase_seconds_sum[{RATE}])) / "
                     f"sum by (phase) (rate(pdserve:request_phase_seconds_count[{RATE}]))", "{{phase}}"),),
              unit="s", stack=True),
        Panel("Time per phase (p90)", "The 90th percentile of each phase on its own (not additive): a phase "
              "whose p90 is far above its mean is the one that makes the tail.",
              _quantiles("pdserve:request_phase_seconds", by="phase")[1:2], unit="s"),
    )),
    Row("Routing and caches", (
        Panel("Local vs remote prefill", "Share of prompts prefilled on their decode worker (conditional "
              "disaggregation: short prompts on a quiet decode worker) against those sent to a prefill worker.",
              (Query(f"sum by (where) (rate(pdserve:router_prefills_total[{RATE}])) / ignoring(where) group_left() "
                     f"sum(rate(pdserve:router_prefills_total[{RATE}]))", "{{where}}"),), unit="percentunit",
              stack=True),
        Panel("Prefix-cache hit ratio per worker", "Blocks found in a worker's own prefix cache over blocks "
              "looked up: how much prompt compute the cache saves on each worker.",
              (Query(f"{_per_worker(_rate('pdserve:prefix_cache_hits_total'))} / "
                     f"{_per_worker(_rate('pdserve:prefix_cache_queries_total'))}", "{{worker}}"),),
              unit="percentunit"),
        Panel("Cached prompt tokens and store hits", "Share of prompt tokens not computed (local prefix cache "
              "or the KV store), the store master's hit ratio since start (blocks served over blocks asked "
              "for), and prompt tokens per second loaded from the store.",
              (Query(f"sum(rate(pdserve:prompt_tokens_cached_total[{RATE}])) / "
                     f"sum(rate(pdserve:prompt_tokens_total[{RATE}]))", "cached prompt share"),
               Query("max(pdserve:store_hit_ratio)", "store hit ratio")), unit="percentunit"),
        Panel("Prompt tokens loaded from the store", "Prompt tokens per second that prefill workers loaded "
              "from the KV store instead of computing them.",
              (Query(f"sum({_per_worker(_rate('pdserve:store_hit_tokens_total'))})", "tokens/s"),)),
        Panel("Failovers and transfer faults", "Requests retried on another worker (a prefill died, a decode "
              "died mid-stream: the stream continues, its KV loaded from the store but for what it recomputed), KV "
              "transfers that failed or timed out, and reservations freed by their deadline because no KV ever "
              "came. Any of these above zero deserves a look at the logs.",
              (Query(f"sum(rate(pdserve:router_retries_total[{RATE}]))", "retries/s"),
               Query(f"sum(rate(pdserve:failover_recomputed_tokens_sum[{RATE}]))", "tokens recomputed/s"),
               Query(f"sum({_per_worker(_rate('pdserve:kv_transfer_failures_total', WORKERS))})",
                     "failed transfers/s"),
               Query(f"sum({_per_worker(_rate('pdserve:expired_reservations_total'))})",
                     "expired reservations/s")), unit="short"),
    )),
    Row("Workers", (
        Panel("Queue depth per role", "Sequences waiting for a batch slot and running, summed per role, and "
              "requests in flight through the routers. A prefill queue that grows is what TTFT feels first.",
              (Query(f"sum by (role) ({_per_worker('pdserve:worker_num_requests_waiting')})", "waiting {{role}}"),
               Query(f"sum by (role) ({_per_worker('pdserve:worker_num_requests_running')})", "running {{role}}"),
               Query("sum(pdserve:num_requests_running)", "in flight (routers)"))),
        Panel("KV cache usage per worker", "Fraction of each worker's KV blocks in use (reserved blocks "
              "included). A decode worker near 1 makes the router reject or preempt.",
              (Query(_per_worker("pdserve:kv_cache_usage_perc"), "{{worker}}"),), unit="percentunit"),
        Panel("KV transfer throughput per worker", "KV bytes per second pushed by prefill workers and "
              "received by decode workers, in GB/s.",
              (Query(f"{_per_worker(_rate('pdserve:kv_transfer_bytes_sent_total', WORKERS))} / 1e9",
                     "sent {{worker}}"),
               Query(f"{_per_worker(_rate('pdserve:kv_transfer_bytes_received_total', WORKERS))} / 1e9",
                     "received {{worker}}")), unit="GBs"),
        Panel("KV transfer bandwidth while sending", "Bytes sent over seconds spent sending, per worker, "
              "in GB/s: the transfer layer's speed when busy (compare with docs/transfer_bandwidth.md).",
              (Query(f"max by (worker) ({_rate('pdserve:kv_transfer_bytes_sent_total', WORKERS)}) / "
                     f"max by (worker) ({_rate('pdserve:kv_transfer_seconds_total', SENT)}) / 1e9",
                     "{{worker}}"),), unit="GBs"),
        Panel("Worker health", "1 while the router routes to a worker, 0 once its health polls fail.",
              (Query(_per_worker("pdserve:worker_healthy"), "{{worker}}"),)),
        Panel("Preemptions", "Sequences preempted for lack of KV blocks, per second and worker.",
              (Query(_per_worker(_rate("pdserve:num_preemptions_total")), "{{worker}}"),)),
    )),
    Row("KV store", (
        Panel("Store contents", "Blocks stored, live store nodes and read leases held.",
              (Query("max(pdserve:store_keys)", "keys"), Query("max(pdserve:store_live_nodes)", "live nodes"),
               Query("max(pdserve:store_leases)", "leases"))),
        Panel("Store node pools", "Fraction of each store node's slots in use, and evictions per second.",
              (Query("max by (node) (pdserve:store_node_slots_used) / max by (node) (pdserve:store_node_slots)",
                     "{{node}} used"),
               Query(f"sum(rate(pdserve:store_evictions_total[{RATE}]))", "evictions/s")), unit="percentunit"),
    )),
)


def panels() -> list[Panel]:
    return [p for row in ROWS for p in row.panels]


def expressions(rate_interval: str = "1m") -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query, with the template variables at their defaults and
    $__rate_interval as given: what a test sends to Prometheus."""
    out = []
    for p in panels():
        for q in p.queries:
            expr = q.expr.replace("$__rate_interval", rate_interval)
            for name, (_, default) in VARIABLES.items():
                expr = expr.replace(f"${name}", default)
            out.append((p.title, expr))
    return out


def dashboard() -> dict:
    width, height = 8, 8
    gpanels: list[dict] = []
    y = 0
    next_id = 1
    for row in ROWS:
        gpanels.append({"type": "row", "title": row.title, "id": next_id, "collapsed": False,
                        "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        next_id += 1
        y += 1
        for i, p in enumerate(row.panels):
            gpanels.append({
                "type": "timeseries", "id": next_id, "title": p.title, "description": p.description,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": height, "w": width, "x": (i % 3) * width, "y": y + (i // 3) * height},
                "fieldConfig": {"defaults": {"unit": p.unit, "custom": {
                    "drawStyle": "line", "lineWidth": 1, "fillOpacity": 20 if p.stack else 0,
                    "stacking": {"mode": "normal" if p.stack else "none", "group": "A"}}}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                            "tooltip": {"mode": "multi", "sort": "desc"}},
                "targets": [{"datasource": {"type": "prometheus", "uid": "${datasource}"}, "expr": q.expr,
                             "legendFormat": q.legend, "refId": chr(ord("A") + j), "range": True}
                            for j, q in enumerate(p.queries)],
            })
            next_id += 1
        y += ((len(row.panels) + 2) // 3) * height
    templating = [{"type": "datasource", "name": "datasource", "label": "Prometheus", "query": "prometheus",
                   "current": {}, "hide": 0, "refresh": 1, "options": []}]
    for name, (options, default) in VARIABLES.items():
        templating.append({"type": "custom", "name": name, "label": f"{name.split('_')[0].upper()} SLO (s)",
                           "query": ",".join(options), "current": {"text": default, "value": default},
                           "options": [{"text": o, "value": o, "selected": o == default} for o in options],
                           "hide": 0})
    return {"uid": UID, "title": "pdserve", "tags": ["pdserve", "llm-serving"], "timezone": "browser",
            "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s",
            "time": {"from": "now-30m", "to": "now"}, "templating": {"list": templating},
            "annotations": {"list": []}, "panels": gpanels,
            "description": "pdserve: latency, goodput, where time goes per phase, routing, caches, workers, "
                           "KV transfer and the KV store. Generated by `make dashboards` (pdserve/dashboards.py)."}


def dashboard_json() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def configmap_yaml() -> str:
    body = dashboard_json()
    indented = "".join(f"    {line}\n" if line else "\n" for line in body.splitlines())
    return ("# Generated by `make dashboards` (pdserve/dashboards.py): the Grafana dashboard as a ConfigMap.\n"
            "# The label is the one Grafana's dashboard sidecar (kube-prometheus-stack) watches for.\n"
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: pdserve-grafana-dashboard\n  labels:\n"
            "    grafana_dashboard: \"1\"\ndata:\n  pdserve.json: |\n" + indented)


def docs_markdown() -> str:
    lines = ["# Dashboards", "",
             "<!-- generated by `make dashboards` from pdserve/dashboards.py; edit that, not this -->", "",
             "One Grafana dashboard, `pdserve` (uid `pdserve-overview`), generated from "
             "`pdserve/dashboards.py` into `deploy/grafana/dashboards/pdserve.json`. docker compose provisions it "
             "in Grafana beside its Prometheus (`http://localhost:3000`, anonymous viewer; see "
             "`deploy/README.md`); on Kubernetes the ConfigMap `pdserve-grafana-dashboard` "
             "(`deploy/k8s/base/grafana-dashboard.yaml`) carries it for Grafana's dashboard sidecar.",
             "",
             "Every expression below runs in CI against a real Prometheus scraping a real `pdserve up` "
             "cluster under a short load (`tests/integration/test_dashboards.py`): one that errors or "
             "returns nothing fails the test, and so does a metric name no process exports.", "",
             "Variables: `datasource` (the Prometheus), `ttft_slo` and `tpot_slo` (the goodput SLOs, in "
             "seconds; each is a bucket bound of its histogram).", ""]
    for row in ROWS:
        lines += [f"## {row.title}", ""]
        for p in row.panels:
            lines += [f"### {p.title}", "", p.description, "", "```promql"]
            lines += [q.expr for q in p.queries]
            lines += ["```", ""]
    return "\n".join(lines)


OUTPUTS = {DASHBOARD_JSON: dashboard_json, K8S_CONFIGMAP: configmap_yaml, DOCS: docs_markdown}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write the Grafana dashboard JSON, its k8s ConfigMap and "
                                             "docs/dashboards.md from pdserve/dashboards.py.")
    ap.add_argument("--check", action="store_true", help="only report (exit 1) if any output is stale")
    args = ap.parse_args(argv)
    stale = []
    for path, render in OUTPUTS.items():
        text = render()
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    if args.check and stale:
        print("stale: " + ", ".join(str(p.relative_to(REPO)) for p in stale) + "; run `make dashboards`")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
