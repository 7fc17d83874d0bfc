"""The planner's decision (planner/planner.py SplitChooser, assign_roles) and cost model (planner/model.py)
on synthetic windows: prefill-heavy short-output load disaggregates under a tight TPOT target,
decode-heavy load goes colocated, hysteresis holds, and role assignment keeps decode capacity."""

from __future__ import annotations

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
    plan = assign_roles([W("d", pb.DECODE), W("p", pb.PREFILL)], Split(0, 0, 2), speed)
    assert [(w.address, r) for w, r in plan] == [("p", pb.COLOCATED), ("d", pb.COLOCATED)]  # decode drains last


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
    p, d = FakeWorker("p", pb.PREFILL, ok), FakeWorker("d", pb.DECODE, dead)
    registry = FakeRegistry([p, d])
    planner = Planner(PlannerConfig(planner="slo"), registry, FakePolicy())
    want = Decision(0, "switch", Split(1, 1), Split(0, 0, 2), "test")
    with caplog.at_level("INFO"):
        got = await planner.apply(want, [p, d])
    assert got.action == "unreachable" and got.target == Split(1, 1)
    assert "cannot reach d" in got.reason and "split unchanged" in got.reason and "DEADLINE_EXCEEDED" in got.reason
    assert (p.role, d.role) == (pb.PREFILL, pb.DECODE) and all(r.role in (pb.PREFILL, pb.DECODE) for r in ok.calls)
    assert "split unchanged" in caplog.text and planner.num_decisions["unreachable"] == 1


async def test_a_worker_dying_mid_switch_fails_that_switch_only():
    from pdserve.planner.planner import Decision, Planner

    class DiesOnSwitch(FakeStub):
        async def SetRole(self, request, timeout=None):
            if request.role != pb.DECODE:  # answers the ping, dies during the drain
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                           "connection reset")
            return pb.SetRoleResponse(role=request.role)

    p, d = FakeWorker("p", pb.PREFILL, FakeStub(None)), FakeWorker("d", pb.DECODE, DiesOnSwitch(None))
    registry = FakeRegistry([p, d])
    planner = Planner(PlannerConfig(planner="slo"), registry, FakePolicy())
    got = await planner.apply(Decision(0, "switch", Split(1, 1), Split(0, 0, 2), "test"), [p, d])
    assert got.action == "switch_failed" and "UNAVAILABLE" in got.reason
    assert not d.draining and d.role == pb.DECODE  # back in rotation as it was; health polls decide the rest
