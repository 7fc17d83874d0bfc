"""Multi-host end to end: deploy/netns/netns_demo.py puts the router, the workers and the KV store
in network namespaces of their own (one address each) and proves generations, a bench run and KV
transfers cross the links with the same tokens as one host. Needs root and iproute2; skips otherwise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "deploy" / "netns" / "netns_demo.py"
EXIT_SKIP = 77

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="network namespaces need iproute2 (`ip`)"),
]


def _run(tmp_path: Path, *args: str) -> dict:
    summary_path = tmp_path / "summary.json"
    result = subprocess.run([sys.executable, str(DEMO), "--summary-json", str(summary_path),
                             "--log-dir", str(tmp_path / "logs"), *args],
                            capture_output=True, text=True, timeout=840)
    if result.returncode == EXIT_SKIP:
        pytest.skip(result.stdout.strip())
    assert summary_path.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert result.returncode == 0 and summary["ok"], (summary.get("problems"), result.stderr[-4000:])
    return summary


@pytest.mark.timeout(900)
def test_components_on_separate_hosts_match_a_single_host(tmp_path):
    summary = _run(tmp_path)
    assert summary["tokens_match"]
    assert summary["bench"]["num_completed"] > 0 and not summary["bench"]["num_failed"]
    assert all(addr.startswith("10.77.0.") for addr in summary["hosts"].values())
    workers = {w["worker_id"]: w for w in summary["workers"]}
    assert all(w["address"].startswith("10.77.0.") for w in workers.values())
    if summary["topology"] == "disaggregated":
        sent = sum(w["kv_bytes_sent"] for w in workers.values() if w["role"] == 1)
        assert sent > 0
        assert summary["link_bytes"]["prefill"]["from_host"] >= sent  # the KV crossed the prefill host's link
        # one long prompt's KV payload, counted on decode, crossed decode's veth (not shared memory/CMA)
        probe = summary["kv_probe"]
        assert probe["kv_bytes"] >= 2**20 and probe["decode_link_bytes_in"] >= probe["kv_bytes"], probe
        for c in summary["completions"]:
            assert c["prefill_worker"] and c["prefill_worker"] != c["decode_worker"]
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert not [ns for ns in namespaces if ns.startswith(summary["namespace_prefix"] + "-")]
