"""ElasticThreads: a worker grows into cores the other processes leave idle and gives them back."""

from __future__ import annotations

import os

import pytest

from pdserve.engine.threads import ElasticThreads, StepThreads, available_cpus, read_cpu_busy_seconds


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


def run_kind(st: StepThreads, kind, ceiling: int, seconds: dict[int, float], steps: int) -> list[int]:
    """`steps` steps of one kind whose time depends only on the thread count; the counts chosen."""
    chosen = []
    for _ in range(steps):
        n = st.choose(kind, ceiling)
        chosen.append(n)
        st.observe(kind, n, seconds[n])
    return chosen


def test_step_threads_take_turns_then_keep_the_faster_count():
    st = StepThreads(probe_steps=3, hold_steps=5)
    decode = StepThreads.kind(False, 3)
    chosen = run_kind(st, decode, 2, {1: 0.004, 2: 0.007}, 6 + 5)
    assert sorted(chosen[:6]) == [1, 1, 1, 2, 2, 2] and chosen[:2] in ([1, 2], [2, 1])  # alternating probes
    assert chosen[6:] == [1] * 5  # held
    assert st.choices() == {"decode/2-3": 1}
    # after the hold they take turns again, and a change of speed is seen
    chosen = run_kind(st, decode, 2, {1: 0.009, 2: 0.007}, 6 + 2)
    assert sorted(chosen[:6]) == [1, 1, 1, 2, 2, 2] and chosen[6:] == [2, 2]


def test_step_threads_decide_each_kind_apart():
    st = StepThreads(probe_steps=2, hold_steps=100)
    decode, prefill = StepThreads.kind(False, 2), StepThreads.kind(True, 100)
    run_kind(st, decode, 2, {1: 0.004, 2: 0.007}, 4)
    run_kind(st, prefill, 2, {1: 0.050, 2: 0.030}, 4)
    assert st.choices() == {"decode/2-3": 1, "prefill/64-127": 2}
    assert StepThreads.kind(False, 2) != StepThreads.kind(False, 4)  # rows by power of two
    # past max_rows every step takes all threads, unprobed (a probe would be a whole slow prefill step)
    big = StepThreads.kind(True, 256)
    assert run_kind(st, big, 2, {1: 0.001, 2: 0.030}, 6) == [2] * 6 and "prefill/256-511" not in st.choices()
    assert st.choose(StepThreads.kind(True, 255), 2) in (1, 2) and "prefill/128-255" not in st.choices()


def test_step_threads_median_ignores_one_outlier_and_one_core_needs_no_choice():
    st = StepThreads(probe_steps=3, hold_steps=10)
    kind = StepThreads.kind(False, 1)
    one_thread = iter([0.002, 0.090, 0.002])  # one GC pause: the mean would pick 2 threads, the median does not
    for _ in range(6):
        n = st.choose(kind, 2)
        st.observe(kind, n, next(one_thread) if n == 1 else 0.003)
    assert st.choices() == {"decode/1-1": 1}
    assert StepThreads().choose(kind, 1) == 1


def test_engine_runs_decode_steps_on_the_count_it_measured(tiny_model_dir):
    """A real engine on the tiny model with 2 threads: the step threads see every step, take turns, decide,
    and the engine's torch thread count follows what it chose; outputs equal the fixed-count engine's."""
    import torch

    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = [[5, 9, 2, 7, 1, 3], [8, 4, 6]]
    outs = {}
    before = torch.get_num_threads()
    try:
        for on in (False, True):
            eng = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_threads=2, step_threads=on))
            if eng.step_threads is not None:
                eng.step_threads.probe_steps = 2
            outs[on] = [c.token_ids for c in eng.generate(prompts, params)]
            if on:
                assert "decode/2-3" in eng.step_threads.choices()
                assert eng.threads_in_force == torch.get_num_threads() in (1, 2)
            else:
                assert eng.step_threads is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert outs[True] == outs[False]
