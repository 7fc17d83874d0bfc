"""Supervisor: keeps a started Cluster's processes running. A child that exits is reported and
started again after a backoff (same command line, so the same ports; workers re-register with the
router and store nodes with the master by themselves); the others keep serving meanwhile. A process
that exits more than `max_restarts` times within `window_s` is in a crash loop: `poll` raises
`CrashLoop` naming it, with its log tail, and the caller stops the cluster.

Starting and stopping the cluster is `cluster.py`'s; this module only decides when to restart.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.cluster import Cluster, Proc


class CrashLoop(RuntimeError):
    """A supervised process keeps dying; the cluster should stop."""


@dataclass(slots=True)
class RestartPolicy:
    backoff_s: float = 0.5  # delay before the first restart; doubles per exit within the window
    max_backoff_s: float = 8.0
    max_restarts: int = 5  # exits within window_s beyond this: a crash loop
    window_s: float = 60.0

    def __post_init__(self) -> None:
        if self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise ValueError("need 0 <= backoff_s <= max_backoff_s")
        if self.max_restarts < 0 or self.window_s <= 0:
            raise ValueError("max_restarts must be >= 0 and window_s > 0")


@dataclass(slots=True)
class _History:
    exits: list[float] = field(default_factory=list)  # monotonic times of exits within the window
    restart_at: float | None = None  # when the pending restart is due (None: none pending)


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "is not running"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


class Supervisor:
    def __init__(self, cluster: Cluster, policy: RestartPolicy | None = None,
                 report: Callable[[str], None] = print) -> None:
        self.cluster = cluster
        self.policy = policy or RestartPolicy()
        self.report = report
        self._history: dict[str, _History] = {}  # process name -> its exits and pending restart
        self.num_restarts = 0

    def poll(self, now: float | None = None) -> None:
        """Notice exited processes and restart those whose backoff has passed. Never blocks on a child."""
        now = time.monotonic() if now is None else now
        p = self.policy
        for proc in list(self.cluster.procs):
            if proc.alive():
                continue
            h = self._history.setdefault(proc.name, _History())
            if h.restart_at is None:
                h.exits = [t for t in h.exits if now - t < p.window_s] + [now]
                if len(h.exits) > p.max_restarts:
                    raise CrashLoop(f"{proc.name} {describe_exit(self._returncode(proc))} {len(h.exits)} times "
                                    f"within {p.window_s:.0f} s (limit {p.max_restarts} restarts); "
                                    f"its log {proc.log_path} ends:\n{proc.log_tail()}")
                delay = min(p.max_backoff_s, p.backoff_s * 2 ** (len(h.exits) - 1))
                h.restart_at = now + delay
                self.report(f"{proc.name} (pid {proc.pid}) {describe_exit(self._returncode(proc))}; "
                            f"restarting it in {delay:.1f} s (exit {len(h.exits)} within {p.window_s:.0f} s)")
            elif now >= h.restart_at:
                h.restart_at = None
                new = self.cluster.respawn(proc.name)
                self.num_restarts += 1
                self.report(f"{new.name} restarted: pid {new.pid}, log {new.log_path}")

    @staticmethod
    def _returncode(proc: Proc) -> int | None:
        return proc.popen.poll() if proc.popen is not None else None
