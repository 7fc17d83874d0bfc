"""Supervisor with real (trivial) child processes: an exiting child is restarted after a doubling
backoff while its sibling keeps running, and one that keeps exiting is reported as a crash loop."""

from __future__ import annotations

import json
import sys

import pytest

from pdserve.cluster import Cluster, ClusterSpec
from pdserve.supervisor import CrashLoop, RestartPolicy, Supervisor, describe_exit


def _wait_exit(cluster: Cluster, name: str) -> None:
    next(p for p in cluster.procs if p.name == name).popen.wait(10)


def test_restarts_with_backoff_then_reports_a_crash_loop(tmp_path):
    cluster = Cluster(ClusterSpec(log_dir=str(tmp_path)))
    try:
        cluster._spawn("steady", [sys.executable, "-c", "import time; time.sleep(60)"])
        cluster._spawn("flaky", [sys.executable, "-c", "import sys; print('bad config'); sys.exit(3)"])
        steady_pid = cluster.procs[0].pid
        lines: list[str] = []
        sup = Supervisor(cluster, RestartPolicy(backoff_s=1.0, max_backoff_s=3.0, max_restarts=3, window_s=100),
                         report=lines.append)
        _wait_exit(cluster, "flaky")
        sup.poll(now=0.0)
        assert "flaky" in lines[-1] and "exited with code 3" in lines[-1] and "in 1.0 s" in lines[-1]
        sup.poll(now=0.5)  # backoff not over: nothing restarted yet
        assert sup.num_restarts == 0
        sup.poll(now=1.0)
        assert sup.num_restarts == 1 and "restarted" in lines[-1]
        state = json.loads(cluster.state_path.read_text())
        flaky = next(r for r in state["processes"] if r["name"] == "flaky")
        assert flaky["restarts"] == 1 and flaky["pid"] == cluster.procs[1].pid
        _wait_exit(cluster, "flaky")
        sup.poll(now=2.0)
        assert "in 2.0 s" in lines[-1]  # doubled
        sup.poll(now=4.0)
        _wait_exit(cluster, "flaky")
        sup.poll(now=5.0)
        assert "in 3.0 s" in lines[-1]  # capped at max_backoff_s
        sup.poll(now=8.0)
        _wait_exit(cluster, "flaky")
        with pytest.raises(CrashLoop, match=r"flaky exited with code 3 4 times(.|\n)*bad config"):
            sup.poll(now=9.0)
        assert cluster.procs[0].alive() and cluster.procs[0].pid == steady_pid  # the sibling was never touched
        assert (tmp_path / "flaky.restart3.log").exists()
    finally:
        cluster.stop(timeout_s=5)


def test_exits_outside_the_window_do_not_count(tmp_path):
    cluster = Cluster(ClusterSpec(log_dir=str(tmp_path)))
    try:
        cluster._spawn("flaky", [sys.executable, "-c", "import sys; sys.exit(1)"])
        sup = Supervisor(cluster, RestartPolicy(backoff_s=0.0, max_backoff_s=0.0, max_restarts=1, window_s=10),
                         report=lambda line: None)
        for t in (0.0, 20.0, 40.0):  # one exit per window: never a crash loop
            _wait_exit(cluster, "flaky")
            sup.poll(now=t)
            sup.poll(now=t)
        assert sup.num_restarts == 3
    finally:
        cluster.stop(timeout_s=5)


def test_describe_exit():
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(2) == "exited with code 2"


def test_policy_checks():
    with pytest.raises(ValueError):
        RestartPolicy(backoff_s=5.0, max_backoff_s=1.0)
    with pytest.raises(ValueError):
        RestartPolicy(max_restarts=-1)
