"""ElasticThreads: a worker grows into cores the other processes leave idle and gives them back."""

from __future__ import annotations

import os

import pytest

from pdserve.engine.threads import ElasticThreads, available_cpus, read_cpu_busy_seconds


class Machine:
    """A fake clock and CPU accounting: `run(seconds, own_cores, other_cores)` advances time while this
    process and the others keep that many cores busy."""

    def __init__(self) -> None:
        self.now = self.busy = self.own = 0.0
        self.set_calls: list[int] = []

    def run(self, seconds: float, own: float, others: float) -> None:
        self.now += seconds
        self.own += own * seconds
        self.busy += (own + others) * seconds

    def controller(self, floor: int, ceiling: int) -> ElasticThreads:
        return ElasticThreads(floor, ceiling, 0.1, set_threads=self.set_calls.append, clock=lambda: self.now,
                              read_busy=lambda: self.busy, read_own=lambda: self.own)


def test_grows_into_idle_cores_and_gives_them_back():
    m = Machine()
    ctl = m.controller(1, 2)
    assert ctl.update() == 1  # no interval has passed yet
    m.run(0.2, own=1.0, others=0.05)  # the neighbour is idle
    assert ctl.update() == 2 and m.set_calls == [2]
    m.run(0.2, own=1.2, others=0.9)  # the neighbour got work: it keeps ~1 core busy even while we hold 2
    assert ctl.update() == 1 and m.set_calls == [2, 1]
    m.run(0.2, own=1.0, others=1.0)
    assert ctl.update() == 1 and m.set_calls == [2, 1]  # no change, no call
    assert ctl.changes == 2


def test_never_leaves_its_bounds_and_waits_for_the_interval():
    m = Machine()
    ctl = m.controller(2, 4)
    m.run(0.2, own=2.0, others=3.9)  # others want more than the whole machine: stay at the share given
    assert ctl.update() == 2
    m.run(0.2, own=2.0, others=0.0)
    assert ctl.update() == 4
    m.run(0.05, own=4.0, others=1.2)  # within the interval: no decision yet
    assert ctl.update() == 4
    m.run(0.1, own=4.0, others=1.2)
    assert ctl.update() == 3  # 4 cores - ~1.2 busy elsewhere


def test_a_fixed_share_or_no_proc_stat_changes_nothing():
    m = Machine()
    fixed = m.controller(2, 2)
    m.run(1.0, own=2.0, others=0.0)
    assert fixed.update() == 2
    blind = ElasticThreads(1, 2, 0.1, set_threads=m.set_calls.append, clock=lambda: m.now, read_busy=lambda: None)
    m.run(1.0, own=1.0, others=0.0)
    assert blind.update() == 1 and m.set_calls == []


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux only")
def test_reads_real_cpu_accounting():
    cpus = set(os.sched_getaffinity(0))
    first = read_cpu_busy_seconds(cpus)
    sum(i * i for i in range(200_000))  # some work of our own
    second = read_cpu_busy_seconds(cpus)
    assert first is not None and second is not None and second >= first > 0
    ctl = ElasticThreads(1, available_cpus(), 0.0, set_threads=lambda n: None)
    assert 1 <= ctl.update() <= available_cpus()
