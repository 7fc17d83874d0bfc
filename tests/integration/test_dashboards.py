"""The Grafana dashboard against reality: a real Prometheus (Debian's `prometheus`) scrapes a real
`pdserve up` cluster (router, 2 prefill, 1 decode, KV store) while `pdserve bench` and a few bad and
over-limit requests run; then every PromQL expression of the dashboard (pdserve/dashboards.py) is
evaluated. One that errors, returns no series or only NaN, or names a metric no process exports, fails.
"""

from __future__ import annotations

import json
import math
import os
import re
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from pdserve import dashboards
from pdserve.cluster import free_port

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.timeout(480),
    pytest.mark.skipif(PROMETHEUS is None, reason="Debian's `prometheus` is not installed; .ci/run installs it "
                                                  "with `apt-get install -y prometheus` when apt is available"),
]

UP_TIMEOUT_S = 180.0
PROMETHEUS_TIMEOUT_S = 60.0
SCRAPE_INTERVAL_S = 1
MAX_INFLIGHT = 4  # the router's --max-inflight-requests: the burst below gets 429s
# `pdserve up` prints one line per process: "  NAME  pid PID  ADDRESS  metrics URL"
PROC_LINE = re.compile(r"^\s+(?P<name>\S+)\s+pid\s+\d+\s+\S+(?:\s+metrics\s+(?P<metrics>\S+))?\s*$")


def _get(url: str, timeout_s: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def _post(url: str, body: bytes) -> int:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def start_up(log_dir: Path) -> tuple[subprocess.Popen, dict[str, str], str]:
    """`pdserve up` as a user runs it; returns (process, {name: metrics URL}, HTTP URL) once it says it is up."""
    argv = [sys.executable, "-m", "pdserve", "--log-level", "warning", "up", "--prefill", "2", "--decode", "1",
            "--store-nodes", "1", "--port", str(free_port()), "--http-port", "0", "--log-dir", str(log_dir),
            "--router-args", f"--max-inflight-requests {MAX_INFLIGHT} --health-interval-s 0.5"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "UCX_WARN_UNUSED_ENV_VARS": "n"})
    assert proc.stdout is not None
    lines_q: queue.Queue[str] = queue.Queue()  # a reader thread: a pipe read must not block the deadline
    threading.Thread(target=lambda: [lines_q.put(line) for line in proc.stdout], daemon=True).start()
    metrics: dict[str, str] = {}
    http_url = ""
    lines: list[str] = []
    deadline = time.monotonic() + UP_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            line = lines_q.get(timeout=1.0)
        except queue.Empty:
            if proc.poll() is not None:
                raise RuntimeError("pdserve up exited:\n" + "".join(lines)) from None
            continue
        lines.append(line)
        m = PROC_LINE.match(line)
        if m and m["metrics"]:
            metrics[m["name"]] = m["metrics"]
            if m["name"] == "router":
                http_url = m["metrics"].rsplit("/metrics", 1)[0]
        if "Ctrl-C stops everything" in line:
            return proc, metrics, http_url
    stop(proc)
    raise TimeoutError("pdserve up did not come up:\n" + "".join(lines))


def stop(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def job_of(name: str) -> str:
    """Process name -> job, as in deploy/prometheus.yml ("prefill-1" -> "prefill")."""
    base, _, index = name.rpartition("-")
    return base if index.isdigit() else name


def prometheus_config(metrics: dict[str, str]) -> str:
    jobs: dict[str, list[str]] = {}
    for name, url in metrics.items():
        jobs.setdefault(job_of(name), []).append(urllib.parse.urlsplit(url).netloc)
    return json.dumps({  # JSON is YAML
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": "5s"},
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]} for job, targets in jobs.items()],
    })


def start_prometheus(tmp: Path, metrics: dict[str, str]) -> tuple[subprocess.Popen, str]:
    config = tmp / "prometheus.yml"
    config.write_text(prometheus_config(metrics))
    port = free_port()
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + PROMETHEUS_TIMEOUT_S
    while _get(f"{url}/-/ready", 2.0)[0] != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError("prometheus did not start:\n" + (tmp / "prometheus.log").read_text(errors="replace"))
        time.sleep(0.2)
    return proc, url


def targets(prom: str) -> list[dict]:
    status, body = _get(f"{prom}/api/v1/targets")
    assert status == 200, body
    return json.loads(body)["data"]["activeTargets"]


def _unix_time(rfc3339: str) -> float:
    """Prometheus's timestamps ("2026-12-01T09:30:01.123456789Z": nanoseconds, which datetime cannot read)."""
    from datetime import datetime

    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", rfc3339)
    assert m, rfc3339
    zone = "+00:00" if m[3] == "Z" else m[3]
    return datetime.fromisoformat(m[1] + zone).timestamp() + float(m[2] or 0)


def wait_scraped_after(prom: str, t: float, what: str) -> None:
    """Until every target was scraped, successfully, after wall time `t`."""
    deadline = time.monotonic() + PROMETHEUS_TIMEOUT_S
    while True:
        ts = targets(prom)
        late = [x["scrapeUrl"] for x in ts if x["health"] != "up" or _unix_time(x["lastScrape"]) <= t]
        if ts and not late:
            return
        assert time.monotonic() < deadline, f"{what}: targets not scraped: {late} {ts}"
        time.sleep(0.2)


def query(prom: str, expr: str) -> tuple[str, list]:
    status, body = _get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    data = json.loads(body or b"{}")
    if status != 200 or data.get("status") != "success":
        return f"HTTP {status}: {data.get('error', body[:200])}", []
    return "", data["data"]["result"]


def run_load(http_url: str, tmp: Path) -> None:
    """`pdserve bench` (shared prefixes: prefix-cache and store hits; prompts over the router's default
    --local-prefill-threshold of 256 tokens, so prefilled remotely: KV moves), then a burst
    over the in-flight limit (429s) and bad bodies (400s). Bounded in count and time."""
    bench = subprocess.run(
        [sys.executable, "-m", "pdserve", "--log-level", "warning", "bench", "--backend", "openai-completions",
         "--base-url", http_url, "--dataset", "shared-prefix", "--prefix-groups", "2", "--prefix-len", "256",
         "--suffix-len", "64", "--random-output-len", "8", "--num-prompts", "24", "--request-rate", "6",
         "--max-concurrency", str(MAX_INFLIGHT), "--max-duration-s", "90",
         "--vocab-size", "2048", "--result-json", str(tmp / "bench.json")],
        capture_output=True, text=True, timeout=180, env={**os.environ, "UCX_WARN_UNUSED_ENV_VARS": "n"})
    assert bench.returncode == 0, bench.stdout + bench.stderr
    summary = json.loads((tmp / "bench.json").read_text())["summary"]
    assert summary["num_completed"] >= 20, summary

    from concurrent.futures import ThreadPoolExecutor

    body = json.dumps({"prompt": list(range(100, 140)), "max_tokens": 24, "ignore_eos": True}).encode()
    with ThreadPoolExecutor(4 * MAX_INFLIGHT) as pool:
        statuses = list(pool.map(lambda _: _post(f"{http_url}/v1/completions", body), range(4 * MAX_INFLIGHT)))
    assert 429 in statuses and 200 in statuses, statuses
    for bad in (b"{not json", json.dumps({"prompt": "x", "max_tokens": "ten"}).encode()):
        assert _post(f"{http_url}/v1/completions", bad) == 400


def test_every_dashboard_query_returns_data(tmp_path):
    try:
        up, metrics, http_url = start_up(tmp_path / "logs")
    except RuntimeError as exc:  # a free port taken by another process before a child bound it: once more
        if "address already in use" not in str(exc):
            raise
        up, metrics, http_url = start_up(tmp_path / "logs-retry")
    prom = None
    try:
        assert {"router", "prefill", "decode", "kvstore-master", "kvstore-node"} == {job_of(n) for n in metrics}
        assert http_url, metrics
        prom, prom_url = start_prometheus(tmp_path, metrics)
        wait_scraped_after(prom_url, time.time(), "before the load")
        run_load(http_url, tmp_path)
        wait_scraped_after(prom_url, time.time(), "after the load")

        status, body = _get(f"{prom_url}/api/v1/label/__name__/values")
        exported = set(json.loads(body)["data"])
        referenced = {name for _, expr in dashboards.expressions() for name in re.findall(r"pdserve:\w+", expr)}
        missing = sorted(referenced - exported)
        assert not missing, f"the dashboard uses metrics no process exports: {missing}"

        failures = []
        for title, expr in dashboards.expressions(rate_interval="1m"):
            error, result = query(prom_url, expr)
            values = [float(r["value"][1]) for r in result]
            if error:
                failures.append(f"{title}: {expr}\n    error: {error}")
            elif not any(math.isfinite(v) for v in values):
                failures.append(f"{title}: {expr}\n    no data: {result}")
        assert not failures, "dashboard queries without data:\n" + "\n".join(failures)
    finally:
        if prom is not None:
            stop(prom)
        stop(up)
