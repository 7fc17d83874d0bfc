"""How many cores this process may use, for the forward pass's thread count."""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def _cgroup_cpu_quota() -> float | None:
    """The cgroup's CPU limit in cores (v2 `cpu.max`, else v1 CFS quota), or None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup quota (rounded up)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc/stat's unit (USER_HZ)


def read_cpu_busy_seconds(cpus: set[int]) -> float | None:
    """Seconds the given CPUs have spent busy since boot (user, nice, system, irq, softirq, steal from
    /proc/stat; idle and iowait left out), or None where /proc/stat cannot be read (not Linux)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        f = [int(x) for x in rest.split()]
        busy += f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)
    return busy / _CLK_TCK


class ElasticThreads:
    """Grows the forward pass's thread count into cores that other processes leave idle, and gives them
    back when they want them.

    `pdserve up` starts one prefill and one decode worker with one core's worth of threads each on a
    2-core machine; while one of them has nothing to do, the other can use both cores (a burst of
    prompts at the start, the decode tail at the end). Every `interval_s`, from /proc/stat: the cores
    the other processes kept busy = the allowed CPUs' busy time minus this process's own CPU time;
    the thread count for the next steps = the cores left (rounded), never below `floor` (the share it
    was given) nor above `ceiling` (the cores it may use). Call `update()` before each step."""

    def __init__(self, floor: int, ceiling: int, interval_s: float = 0.1, *,
                 set_threads: Callable[[int], None] | None = None, clock: Callable[[], float] = time.monotonic,
                 read_busy: Callable[[], float | None] | None = None,
                 read_own: Callable[[], float] = time.process_time) -> None:
        self.floor, self.ceiling = max(1, floor), max(1, floor, ceiling)
        self.interval_s = interval_s
        self._set_threads = set_threads or _set_torch_threads
        self._clock, self._read_own = clock, read_own
        cpus = _allowed_cpus()
        self._read_busy = read_busy or (lambda: read_cpu_busy_seconds(cpus))
        self.threads = self.floor
        self.changes = 0  # how many times the count moved (exported for tests and logs)
        self._mark = self._sample()

    def _sample(self) -> tuple[float, float | None, float]:
        return self._clock(), self._read_busy(), self._read_own()

    def update(self) -> int:
        """Re-decide at most once per interval; returns the thread count in force."""
        now = self._clock()
        if self.ceiling == self.floor or now - self._mark[0] < self.interval_s:
            return self.threads
        t0, busy0, own0 = self._mark
        self._mark = sample = self._sample()
        _, busy1, own1 = sample
        if busy0 is None or busy1 is None:  # no /proc/stat: keep the share given
            return self.threads
        window = sample[0] - t0
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / window  # cores the other processes kept busy
        target = min(self.ceiling, max(self.floor, round(self.ceiling - others)))
        if target != self.threads:
            self.threads = target
            self.changes += 1
            self._set_threads(target)
        return self.threads


def _set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


class StepThreads:
    """Learns, for each kind of step, whether it runs faster on one thread or on all the threads it may use,
    from the step times the engine measures while serving.

    A step's kind is (computes prompt tokens or not, its row count's power of two). On a small model the
    second OpenMP thread costs more than it gives at decode sizes: each parallel region must wake it, and
    between regions it falls asleep while the engine thread waits for the GIL (tiny at 4 req/s served, 2
    threads: 7.2 ms per decode step, 1 thread: 4.6 ms). For each kind of at most `max_rows` rows the two
    counts take turns for `probe_steps` steps each, the one with the lower median wins, and it is kept for
    the next `hold_steps` steps of that kind, after which they take turns again (the machine's load and the
    contexts change). Steps of more rows always take all threads: there the GEMMs gain from both on every
    model measured (tiny's 1024-token prefill steps: 0.08 ms per token on 2 threads, 0.11 on 1), and a
    probe on one thread would cost a whole slow prefill step. Measures and chooses only; the caller sets
    the thread count."""

    def __init__(self, probe_steps: int = 4, hold_steps: int = 256, max_rows: int = 255) -> None:
        self.probe_steps, self.hold_steps = max(1, probe_steps), max(1, hold_steps)
        self.max_rows = max_rows
        self._kinds: dict[tuple[bool, int], _StepKind] = {}

    @staticmethod
    def kind(computes_prompt: bool, rows: int) -> tuple[bool, int]:
        return computes_prompt, max(1, rows).bit_length()

    def choose(self, kind: tuple[bool, int], ceiling: int) -> int:
        """Threads for the next step of this kind, at most `ceiling`."""
        if ceiling <= 1 or kind[1] > self.max_rows.bit_length():
            return max(1, ceiling)
        k = self._kinds.get(kind)
        if k is None or k.ceiling != ceiling:
            k = self._kinds[kind] = _StepKind(ceiling)
        if k.best is not None and k.held < self.hold_steps:
            k.held += 1
            return k.best
        if k.best is not None:  # hold over: take turns again
            k.best, k.samples = None, {1: [], ceiling: []}
        return min(k.samples, key=lambda n: (len(k.samples[n]), n == k.last))

    def observe(self, kind: tuple[bool, int], threads: int, seconds: float) -> None:
        """The measured time of a step of this kind run on `threads`."""
        k = self._kinds.get(kind)
        if k is None or k.best is not None or threads not in k.samples:
            return
        k.samples[threads].append(seconds)
        k.last = threads
        if all(len(s) >= self.probe_steps for s in k.samples.values()):
            k.best = min(k.samples, key=lambda n: statistics.median(k.samples[n]))
            k.held = 0

    def choices(self) -> dict[str, int]:
        """The count each decided kind runs on now (for logs and tests): 'decode/4-7' -> threads."""
        return {f"{'prefill' if p else 'decode'}/{1 << (b - 1)}-{(1 << b) - 1}": k.best
                for (p, b), k in sorted(self._kinds.items()) if k.best is not None}


class _StepKind:
    __slots__ = ("ceiling", "samples", "best", "held", "last")

    def __init__(self, ceiling: int) -> None:
        self.ceiling = ceiling
        self.samples: dict[int, list[float]] = {1: [], ceiling: []}
        self.best: int | None = None
        self.held = 0
        self.last = 0
