"""The planner's decision (planner/planner.py SplitChooser, assign_roles) and cost model (planner/model.py)
on synthetic windows: prefill-heavy short-output load disaggregates under a tight TPOT target,
decode-heavy load goes colocated, hysteresis holds, and role assignment keeps decode capacity."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import grpc
import pytest

from pdserve.planner.config import PlannerConfig
from pdserve.planner.model import Load, Split, StepModel, candidate_splits, predict
from pdserve.planner.planner import SplitChooser, assign_roles, split_of
from pdserve.planner.signals import FinishedRequest, SignalWindow
from pdserve.proto import pdserve_pb2 as pb

STEP = StepModel(fixed_s=4e-3, per_seq_s=1.5e-3, per_token_s=1.2e-4)


def window(n: int, prompt: int, output: int, rate: float, gap1_s: float, gaps_s: float, remote: bool,
           ttft_s: float = 0.1) -> SignalWindow:
    w = SignalWindow(window_s=60, min_requests=8)
    for i in range(n):
        w.add(FinishedRequest(finished_at=i / rate, prompt_tokens=prompt, cached_tokens=0, output_tokens=output,
                              ttft_s=ttft_s, tpot_s=(gap1_s + (output - 2) * gaps_s) / (output - 1), gap1_s=gap1_s,
                              gaps_s=gaps_s, remote=remote))
    return w


def test_candidates_and_split_names():
    assert [str(s) for s in candidate_splits(3)] == ["3 colocated", "1P:2D", "2P:1D"]
    assert split_of([pb.PREFILL, pb.DECODE, pb.DECODE]) == Split(1, 2)
    assert str(Split(1, 1, 1)) == "1P:1D+1 colocated"


def test_model_capacity_pools_colocated_and_a_split_isolates_decode():
    load = Load(arrival_rate=8, prompt_tokens=300, output_tokens=11, step=STEP, stall_s=0.06, handoff_s=0.01)
    coloc = predict(Split(0, 0, 2), load, 1.0, 0.013)
    split = predict(Split(1, 1), load, 1.0, 0.013)
    assert coloc.capacity_rps > split.capacity_rps  # pooling: colocated always has the most capacity here
    assert split.tpot_s < coloc.tpot_s  # ... but its decodes wait behind no prefill
    assert split.goodput_rps > coloc.goodput_rps
    overloaded = predict(Split(1, 1), Load(100, 300, 11, STEP), 1.0, 0.013)
    assert overloaded.goodput_rps == 0 and overloaded.utilization > 1


def test_slo_mode_moves_with_the_workload_and_holds_between():
    config = PlannerConfig(planner="slo", planner_tpot_slo_ms=13, planner_ttft_slo_ms=1000, planner_hold_s=10,
                           planner_confirm=2)
    chooser = SplitChooser(config)
    heavy = window(40, prompt=300, output=11, rate=8, gap1_s=0.06, gaps_s=0.006, remote=False).snapshot(
        5, 1.2e-4, STEP, 1.0)
    coloc = Split(0, 0, 2)
    first = chooser.decide(10, coloc, heavy)
    assert first.action == "hold" and "1/2" in first.reason  # needs a confirmation
    second = chooser.decide(12, coloc, heavy)
    assert second.action == "switch" and second.target == Split(1, 1), second.reason
    chooser.last_change_at = 12
    light = window(40, prompt=40, output=200, rate=4, gap1_s=0.012, gaps_s=0.012, remote=True,
                   ttft_s=0.03).snapshot(10, 1.2e-4, STEP, 4.0)
    held = chooser.decide(14, Split(1, 1), light)
    assert held.action == "hold" and "holding" in held.reason  # hysteresis: within hold_s
    chooser.decide(30, Split(1, 1), light)
    back = chooser.decide(32, Split(1, 1), light)
    assert back.action == "switch" and back.target == coloc, back.reason


def test_throughput_mode_pools_and_too_little_evidence_holds():
    chooser = SplitChooser(PlannerConfig(planner="throughput", planner_confirm=1, planner_hold_s=0))
    snap = window(40, prompt=300, output=11, rate=8, gap1_s=0.06, gaps_s=0.006, remote=True).snapshot(
        5, 1.2e-4, STEP, 1.0)
    assert chooser.decide(10, Split(1, 1), snap).target == Split(0, 0, 2)
    few = window(3, prompt=300, output=11, rate=8, gap1_s=0.06, gaps_s=0.006, remote=True).snapshot(
        1, 1.2e-4, STEP, 1.0)
    d = chooser.decide(10, Split(1, 1), few)
    assert d.action == "hold" and "not enough evidence" in d.reason


def test_scale_wishes():
    chooser = SplitChooser(PlannerConfig(planner="slo"))
    busy = window(200, prompt=300, output=64, rate=40, gap1_s=0.02, gaps_s=0.01, remote=True).snapshot(
        5, 1.2e-4, STEP, 8.0)
    assert chooser.scale_wish(5, Split(1, 1), busy).action == "scale_up"
    idle = window(10, prompt=30, output=4, rate=0.2, gap1_s=0.005, gaps_s=0.005, remote=True).snapshot(
        50, 1.2e-4, STEP, 1.0)
    assert chooser.scale_wish(50, Split(1, 2), idle).action == "scale_down"


@dataclass
class W:
    address: str
    role: int


def test_assign_roles_keeps_workers_in_place_and_gives_prefill_to_the_fastest():
    ws = [W("a", pb.DECODE), W("b", pb.DECODE), W("c", pb.COLOCATED)]
    speed = lambda w: {"a": 2e-4, "b": 1e-4, "c": 3e-4}.get(w.address, 5e-4)  # noqa: E731
    assert [(w.address, r) for w, r in assign_roles(ws, Split(1, 2), speed)] == [("c", pb.PREFILL)]  # one switch
    plan = assign_roles(ws, Split(2, 0, 1), speed)
    assert [(w.address, r) for w, r in plan] == [("b", pb.PREFILL), ("a", pb.PREFILL)]  # fastest first
    plan = assign_roles([W("p", pb.PREFILL), W("q", pb.PREFILL), W("d", pb.DECODE)], Split(1, 2), speed)
    assert [r for _, r in plan] == [pb.DECODE]
    assert assign_roles(ws, Split(0, 2, 1), speed) == []
    # all colocated from 1P:1D: only the prefill worker switches; with no prefill worker left the decode
    # worker prefills every request itself, which is what colocated means (split_of counts it so)
    plan = assign_roles([W("d", pb.DECODE), W("p", pb.PREFILL)], Split(0, 0, 2), speed)
    assert [(w.address, r) for w, r in plan] == [("p", pb.COLOCATED)]
    assert split_of([pb.DECODE, pb.COLOCATED]) == Split(0, 0, 2) and split_of([pb.DECODE, pb.DECODE]) == Split(0, 0, 2)
    plan = assign_roles([W("d", pb.DECODE), W("c", pb.COLOCATED)], Split(1, 1), speed)
    assert [(w.address, r) for w, r in plan] == [("c", pb.PREFILL)]  # and back: one switch again
    plan = assign_roles([W("p", pb.PREFILL), W("c", pb.COLOCATED)], Split(0, 0, 2), speed)
    assert [(w.address, r) for w, r in plan] == [("p", pb.COLOCATED)]


def test_config_checks():
    with pytest.raises(ValueError, match="planner_scale_down_utilization"):
        PlannerConfig(planner_scale_down_utilization=0.9, planner_scale_up_utilization=0.5)


class FakeStub:
    def __init__(self, fail: grpc.StatusCode | None) -> None:
        self.fail = fail
        self.calls: list[pb.SetRoleRequest] = []

    async def SetRole(self, request, timeout=None):
        self.calls.append(request)
        if self.fail is not None:
            raise grpc.aio.AioRpcError(self.fail, grpc.aio.Metadata(), grpc.aio.Metadata(), "no answer")
        return pb.SetRoleResponse(previous_role=pb.DECODE, role=request.role)


@dataclass
class FakeWorker:
    address: str
    role: int
    control_stub: FakeStub
    healthy: bool = True
    draining: bool = False
    worker_id: str = ""


class FakeRegistry:
    def __init__(self, workers) -> None:
        self.workers = {w.address: w for w in workers}

    def set_role(self, address, role, draining) -> None:
        self.workers[address].role, self.workers[address].draining = role, draining


class FakePolicy:
    prefill_s_per_token = 1.2e-4

    def s_per_token(self, worker) -> float:
        return 1.2e-4


async def test_a_worker_that_cannot_be_reached_leaves_the_split_unchanged(caplog):
    from pdserve.planner.planner import Decision, Planner

    ok, dead = FakeStub(None), FakeStub(grpc.StatusCode.DEADLINE_EXCEEDED)
    c, d = FakeWorker("c", pb.COLOCATED, ok), FakeWorker("d", pb.COLOCATED, dead)
    registry = FakeRegistry([c, d])
    planner = Planner(PlannerConfig(planner="slo"), registry, FakePolicy())
    want = Decision(0, "switch", Split(0, 0, 2), Split(1, 1), "test")  # both must switch
    with caplog.at_level("INFO"):
        got = await planner.apply(want, [c, d])
    assert got.action == "unreachable" and got.target == Split(0, 0, 2)
    assert "cannot reach d" in got.reason and "split unchanged" in got.reason and "DEADLINE_EXCEEDED" in got.reason
    assert (c.role, d.role) == (pb.COLOCATED, pb.COLOCATED) and all(r.role == pb.COLOCATED for r in ok.calls)
    assert "split unchanged" in caplog.text and planner.num_decisions["unreachable"] == 1


async def test_a_worker_dying_mid_switch_fails_that_switch_only():
    from pdserve.planner.planner import Decision, Planner

    class DiesOnSwitch(FakeStub):
        async def SetRole(self, request, timeout=None):
            if request.role != pb.PREFILL:  # answers the ping, dies during the drain
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                           "connection reset")
            return pb.SetRoleResponse(role=request.role)

    p, d = FakeWorker("p", pb.PREFILL, DiesOnSwitch(None)), FakeWorker("d", pb.DECODE, FakeStub(None))
    registry = FakeRegistry([p, d])
    planner = Planner(PlannerConfig(planner="slo"), registry, FakePolicy())
    got = await planner.apply(Decision(0, "switch", Split(1, 1), Split(0, 0, 2), "test"), [p, d])
    assert got.action == "switch_failed" and "UNAVAILABLE" in got.reason and "split now 1P:1D" in got.reason
    assert not p.draining and p.role == pb.PREFILL  # back in rotation as it was; health polls decide the rest


# ---- overload, arrivals, per-worker speeds ------------------------------------------------------------
def arrivals(w: SignalWindow, n: int, rate: float, prompt: int, max_tokens: int, start: float = 0.0) -> SignalWindow:
    from pdserve.planner.signals import Arrival

    for i in range(n):
        w.arrive(Arrival(start + i / rate, prompt, max_tokens))
    return w


def test_arrivals_give_the_offered_rate_and_lengths_before_requests_finish():
    # 4 req/s offered, 2 s in: nothing finished yet (outputs of 64 take seconds), the planner can still judge
    w = arrivals(SignalWindow(window_s=10, min_requests=8), 8, rate=4, prompt=256, max_tokens=64)
    snap = w.snapshot(2.0, 1e-3, STEP, 1.0)
    assert snap.num_requests == 0 and snap.num_arrivals == 8 and snap.load is not None
    assert snap.arrival_rate == pytest.approx(4.0, rel=0.15) and snap.output_tokens == 64 and snap.prompt_tokens == 256
    # an overloaded split completes at its capacity (here 2/s): the finished alone would understate the load
    done = window(16, prompt=256, output=64, rate=2, gap1_s=0.2, gaps_s=0.15, remote=True)
    arrivals(done, 40, rate=4, prompt=256, max_tokens=64)
    snap = done.snapshot(9.9, 1e-3, STEP, 30.0)
    assert snap.arrival_rate == pytest.approx(4.0, rel=0.1) and snap.output_tokens == 64
    assert arrivals(SignalWindow(10, 8), 5, 4, 256, 64).snapshot(2.0, 1e-3, STEP).load is None  # too few


def overloaded_snapshot() -> "Snapshot":  # noqa: F821
    """6 req/s offered to two workers that serve at most ~5/s together (as the small model at 4 req/s on 2
    cores in benchmarks/disagg_vs_colocated.py): every split's queues grow."""
    w = SignalWindow(window_s=10, min_requests=8)
    arrivals(w, 16, rate=6, prompt=256, max_tokens=64)
    step = StepModel(fixed_s=0.02, per_seq_s=2e-3, per_token_s=1e-3)
    return w.snapshot(16 / 6, 1e-3, step, 30.0)


def test_slo_mode_leaves_an_overloaded_split_for_the_one_with_more_capacity():
    snap = overloaded_snapshot()
    cur = predict(Split(1, 1), snap.load, 4.5, 0.08)
    coloc = predict(Split(0, 0, 2), snap.load, 4.5, 0.08)
    assert cur.goodput_rps == coloc.goodput_rps == 0  # goodput cannot tell them apart ...
    assert coloc.utilization > 1 and coloc.capacity_rps > 1.1 * cur.capacity_rps  # ... capacity can
    chooser = SplitChooser(PlannerConfig(planner="slo", planner_tpot_slo_ms=80, planner_ttft_slo_ms=4500,
                                         planner_confirm=2, planner_hold_s=5))
    assert chooser.decide(4, Split(1, 1), snap).action == "hold"  # 1/2
    d = chooser.decide(5, Split(1, 1), snap)
    assert d.action == "switch" and d.target == Split(0, 0, 2) and "current split overloaded" in d.reason, d.reason
    tiny = dataclasses.replace(coloc, goodput_rps=0.003)  # a sliver of predicted goodput is no reason
    assert not chooser.better(tiny, dataclasses.replace(cur, utilization=0.99))
    chooser.last_change_at = 5
    for t in (6, 12, 20):  # still overloaded once colocated: the best there is, so it stays (no flapping)
        held = chooser.decide(t, Split(0, 0, 2), snap)
        assert held.action == "hold" and "current split is the best" in held.reason, held.reason


def test_a_split_that_meets_the_targets_is_not_left_for_capacity():
    w = arrivals(SignalWindow(window_s=10, min_requests=8), 16, rate=1, prompt=256, max_tokens=64)
    snap = w.snapshot(16, 1e-4, STEP, 4.0)
    chooser = SplitChooser(PlannerConfig(planner="slo", planner_confirm=1, planner_hold_s=0))
    assert predict(Split(1, 1), snap.load, 1.0, 0.05).utilization < 1
    assert chooser.decide(20, Split(1, 1), snap).action == "hold"


def fed_speed(prefill_s_per_token: float, steps: list[tuple[int, float]]):
    """A router/worker_speed.py WorkerSpeed fed step counters: prefill at the given s/token, then decode
    polls of (batch, step seconds)."""
    from pdserve.engine.step_times import StepTimes
    from pdserve.router.worker_speed import WorkerSpeed

    sp, c = WorkerSpeed(), StepTimes()
    sp.observe(c.copy())
    c.num_prefill_steps, c.prefill_step_tokens, c.prefill_step_seconds = 10, 1000, 1000 * prefill_s_per_token
    sp.observe(c.copy())
    for batch, step_s in steps:
        c.num_decode_steps += 10
        c.decode_step_seqs += 10 * batch
        c.decode_step_seconds += 10 * step_s
        sp.observe(c.copy())
    return sp


@dataclass
class SpeedWorker:
    address: str
    role: int
    speed: object


def test_the_model_uses_each_workers_learnt_speed():
    from pdserve.planner.planner import measured_speeds

    # a: fast prefill, slow decode; b: the reverse (learnt from their step counters, a decode slope each)
    a = SpeedWorker("a", pb.COLOCATED, fed_speed(2e-4, [(2, 0.024), (8, 0.072)]))  # 8 ms per sequence
    b = SpeedWorker("b", pb.COLOCATED, fed_speed(2e-3, [(2, 0.006), (8, 0.012)]))  # 1 ms per sequence
    speeds = measured_speeds([a, b], FakeSpeedPolicy())
    assert speeds[0].decode_fit == pytest.approx((0.008, 0.008)) and speeds[1].decode_fit == pytest.approx((0.004, 0.001))
    w = arrivals(SignalWindow(window_s=10, min_requests=8), 20, rate=2, prompt=256, max_tokens=64)
    snap = w.snapshot(10, 1e-3, STEP, 4.0, speeds)
    assert [s.per_token_s for s in snap.load.workers] == [2e-4, 2e-3]
    # prefill on a, decode on b beats pooling them: both do what they are fast at
    split, coloc = predict(Split(1, 1), snap.load, 1.0, 0.05), predict(Split(0, 0, 2), snap.load, 1.0, 0.05)
    assert split.capacity_rps > 1.5 * coloc.capacity_rps
    chooser = SplitChooser(PlannerConfig(planner="throughput", planner_confirm=1, planner_hold_s=0))
    assert chooser.decide(10, Split(0, 0, 2), snap).target == Split(1, 1)
    # the same pool means for both workers (what the model assumed before) pool to colocated
    mean = predict(Split(0, 0, 2), Load(2, 256, 64, snap.load.step), 1.0, 0.05)
    assert mean.capacity_rps > predict(Split(1, 1), Load(2, 256, 64, snap.load.step), 1.0, 0.05).capacity_rps


def test_a_worker_that_never_decoded_decodes_as_the_measured_ones():
    from pdserve.planner.planner import measured_speeds

    p = SpeedWorker("p", pb.PREFILL, fed_speed(1e-3, []))
    d = SpeedWorker("d", pb.DECODE, fed_speed(1e-3, [(30, 0.15), (31, 0.15)]))  # batch barely varied: flat
    speeds = measured_speeds([p, d], FakeSpeedPolicy())
    assert speeds[0].decode_fit is None and speeds[1].decode_fit[1] == 0
    w = arrivals(SignalWindow(window_s=10, min_requests=8), 20, rate=2, prompt=256, max_tokens=64)
    steps = w.snapshot(10, 1e-3, STEP, 30.0, speeds).load.workers
    assert steps[1].step_s(30, 0) == pytest.approx(0.15, rel=0.05)  # STEP's shape through its mean step
    assert steps[0].step_s(30, 0) == pytest.approx(steps[1].step_s(30, 0))  # and the prefill worker's the same


class FakeSpeedPolicy:
    def s_per_token(self, worker) -> float:
        return worker.speed.prefill_s_per_token


def test_equal_workers_measured_under_different_mixes_stay_equal():
    from pdserve.planner.model import distinct_speeds

    # after 1P:1D -> colocated under overload (the small-model run): the ex-prefill worker's s/token comes from
    # pure prefill steps, the decode worker's from prefills carrying its batch; its decode slope is fitted at
    # a bigger batch. As measured, that looks like a prefill-fast and a decode-fast worker
    a = StepModel(fixed_s=0.02, per_seq_s=6e-3, per_token_s=1.0e-3)
    b = StepModel(fixed_s=0.03, per_seq_s=4e-3, per_token_s=1.6e-3)
    raw = Load(3.6, 262, 71, StepModel(), workers=(a, b))
    assert predict(Split(1, 1), raw, 4.5, 0.07).capacity_rps > 1.1 * predict(Split(0, 0, 2), raw, 4.5, 0.07).capacity_rps
    same = distinct_speeds([a, b])
    assert same[0] == same[1] and same[0].per_token_s == pytest.approx(2 / (1 / 1.0e-3 + 1 / 1.6e-3))
    load = Load(3.6, 262, 71, StepModel(), workers=same)
    assert predict(Split(0, 0, 2), load, 4.5, 0.07).capacity_rps > predict(Split(1, 1), load, 4.5, 0.07).capacity_rps
    # the snapshot applies it: colocated under that overload stays colocated
    from pdserve.planner.signals import MeasuredSpeed
    speeds = [MeasuredSpeed(1.0e-3, (0.02, 6e-3), (5, 0.05)), MeasuredSpeed(1.6e-3, (0.03, 4e-3), (15, 0.09))]
    w = arrivals(SignalWindow(window_s=10, min_requests=8), 30, rate=3.6, prompt=262, max_tokens=71)
    snap = w.snapshot(30 / 3.6, 1e-3, STEP, 10.0, speeds)
    chooser = SplitChooser(PlannerConfig(planner="slo", planner_confirm=1, planner_hold_s=0,
                                         planner_tpot_slo_ms=70, planner_ttft_slo_ms=4500))
    assert chooser.decide(10, Split(0, 0, 2), snap).action == "hold"
    # a worker 3x off keeps its own (a three-worker pool: two alike, one another device)
    fast = StepModel(fixed_s=0.002, per_seq_s=1e-3, per_token_s=1e-4)
    got = distinct_speeds([a, b, fast])
    assert got[2] == fast and got[0].per_token_s == got[1].per_token_s != fast.per_token_s


def test_an_overloaded_split_keeps_its_streak_through_one_evaluation_under_the_margin():
    """Overloaded 1P:1D, colocated best: one evaluation whose edge dips under the margin (the first polls'
    learnt speeds swing) neither confirms nor cancels; a split that is no longer overloaded cancels."""
    snap = overloaded_snapshot()
    chooser = SplitChooser(PlannerConfig(planner="slo", planner_tpot_slo_ms=80, planner_ttft_slo_ms=4500,
                                         planner_confirm=2, planner_hold_s=5))
    assert "1/2" in chooser.decide(4, Split(1, 1), snap).reason
    # one evaluation in which colocated's capacity edge is 5 %: under the 10 % margin
    cur = predict(Split(1, 1), snap.load, 4.5, 0.08)
    edge = dataclasses.replace(predict(Split(0, 0, 2), snap.load, 4.5, 0.08), capacity_rps=1.05 * cur.capacity_rps)
    assert cur.utilization >= 1 and not chooser.better(edge, cur)
    chooser.best = lambda n, s: edge  # the chooser sees only that evaluation's edge
    kept = chooser.decide(4.5, Split(1, 1), snap)
    assert kept.action == "hold" and "streak kept at 1/2" in kept.reason, kept.reason
    del chooser.best
    d = chooser.decide(5, Split(1, 1), snap)
    assert d.action == "switch" and d.target == Split(0, 0, 2), d.reason
    # not overloaded any more: an edge under the margin cancels the streak
    light = arrivals(SignalWindow(window_s=10, min_requests=8), 16, rate=1, prompt=256, max_tokens=64).snapshot(
        16, 1e-4, STEP, 4.0)
    fresh = SplitChooser(PlannerConfig(planner="slo", planner_confirm=2, planner_hold_s=0))
    fresh._candidate, fresh._streak = Split(0, 0, 2), 1
    held = fresh.decide(20, Split(1, 1), light)
    assert held.action == "hold" and fresh._streak == 0


def test_a_queued_backlog_counts_as_load_still_to_serve():
    """Arrivals slowed to ~1/s but 20 prompts still wait for their first token: over the next window they are
    load (backlog / window_s on top of the arrival rate), so the split is judged as under that load."""
    w = arrivals(SignalWindow(window_s=10, min_requests=8), 10, rate=1, prompt=256, max_tokens=64)
    light = w.snapshot(10, 1e-3, STEP, 4.0)
    queued = w.snapshot(10, 1e-3, STEP, 4.0, backlog_tokens=20 * 256)
    assert light.backlog == 0 and queued.backlog == pytest.approx(20)
    assert queued.arrival_rate == pytest.approx(light.arrival_rate + 2.0)
    assert "backlog 20" in queued.describe() and "backlog" not in light.describe()
    assert queued.load.arrival_rate == pytest.approx(queued.arrival_rate)


def test_conditional_disaggregation_share_of_the_prefill_work():
    """Where the window saw a prefill pool at work, the share of the computed prompt tokens it took (the rest
    prefilled on decode workers: short prompts, overflow) is what loads it; the decode workers carry the rest.
    A 100-worker simulation had 30P:70D predicted overloaded (every prompt on the 30 prefill workers) while
    58 % of its prefills ran locally, and moved to 86P:14D at half the goodput."""
    load = Load(arrival_rate=30, prompt_tokens=300, output_tokens=11, step=STEP)
    alone = predict(Split(1, 1), load, 1.0, 0.05)
    assert alone.utilization > 1 and alone.ttft_s == float("inf")  # 30/s x 300 x 1.2e-4 s = 1.08 on one worker
    shared = predict(Split(1, 1), dataclasses.replace(load, remote_share=0.6), 1.0, 0.05)
    assert shared.utilization < 1 and shared.capacity_rps > alone.capacity_rps
    assert shared.ttft_s < 1.0 and 0 < shared.tpot_s < float("inf")  # finite: the split carries it
    # the decode worker pays for its own prefills: TPOT above the all-remote split's at a load both carry
    light = Load(arrival_rate=2, prompt_tokens=300, output_tokens=11, step=STEP)
    assert predict(Split(1, 1), dataclasses.replace(light, remote_share=0.4), 1.0, 0.05).tpot_s > \
        predict(Split(1, 1), light, 1.0, 0.05).tpot_s
    # the window: tokens prefilled remotely over all computed tokens; no remote prefill seen -> 1
    w = SignalWindow(window_s=60, min_requests=4)
    for i in range(8):
        remote = i % 2 == 0
        w.add(FinishedRequest(finished_at=i, prompt_tokens=300 if remote else 100, cached_tokens=0, output_tokens=11,
                              ttft_s=0.1, tpot_s=0.01, gap1_s=0.02, gaps_s=0.01, remote=remote))
    assert w.snapshot(8, 1.2e-4, STEP, 2.0).load.remote_share == pytest.approx(0.75)
    local = window(8, prompt=300, output=11, rate=4, gap1_s=0.02, gaps_s=0.01, remote=False)
    assert local.snapshot(2, 1.2e-4, STEP, 2.0).load.remote_share == 1.0
