"""The planner: every interval, sums the live signals, predicts each candidate split (planner/model.py),
and moves the cluster to the best one through role switches (WorkerControl.SetRole), with hysteresis;
asks an orchestrator hook for more or fewer workers. Every decision is logged with its reason, kept
(`Planner.decisions`) and exported as metrics.

`SplitChooser` is the decision alone (no I/O): the router's `Planner` and the simulator
(planner/simulator.py) both run it. The planner runs inside the router (`pdserve router --planner slo`):
the router already holds every signal it reads and the registry it must update at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shlex
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from pdserve.planner.config import PlannerConfig
from pdserve.planner.model import Prediction, Split, StepModel, candidate_splits, predict
from pdserve.planner.signals import Arrival, FinishedRequest, MeasuredSpeed, SignalWindow, Snapshot
from pdserve.proto import pdserve_pb2 as pb

logger = logging.getLogger(__name__)

ROLE_OF = {"prefill": pb.PREFILL, "decode": pb.DECODE, "colocated": pb.COLOCATED}


@dataclass(frozen=True, slots=True)
class Decision:
    at: float
    action: str  # hold | switch | switched | unreachable | switch_failed | scale_up | scale_down
    current: Split
    target: Split
    reason: str


MIN_GAIN_SHARE = 0.02  # a predicted gain smaller than this share of the arrival rate is no gain (noise)


def split_of(roles: Iterable[int]) -> Split:
    """The split these roles make. With no prefill worker, a decode worker prefills every request itself
    (router/policy.py: no prefill worker to send it to), so it counts as colocated: 1 decode + 1 colocated
    is "2 colocated", and reaching all colocated from 1P:1D switches only the prefill worker."""
    roles = list(roles)
    p, d, c = roles.count(pb.PREFILL), roles.count(pb.DECODE), roles.count(pb.COLOCATED)
    return Split(p, d, c) if p else Split(0, 0, d + c)


def measured_speeds(workers, policy) -> tuple[MeasuredSpeed, ...]:
    """Each worker's speed as the router learnt it from its step times (its `speed`, a
    router/worker_speed.py WorkerSpeed), prefill at the policy's seconds per token for it."""
    out = []
    for w in workers:
        sp = w.speed
        out.append(MeasuredSpeed(policy.s_per_token(w), sp.decode_fit() if sp.has_decode() else None,
                                 sp.decode_mean()))
    return tuple(out)


class SplitChooser:
    """Which split the cluster should have, with hysteresis (hold time, confirmations, margin)."""

    def __init__(self, config: PlannerConfig) -> None:
        self.config = config
        self.last_change_at = -math.inf
        self._candidate: Split | None = None
        self._streak = 0

    def score(self, p: Prediction) -> float:
        return p.capacity_rps if self.config.planner == "throughput" else p.goodput_rps

    def best(self, num_workers: int, snap: Snapshot) -> Prediction:
        """The split with the top score; among those within the margin of it, the one with the most
        headroom (lowest utilization)."""
        assert snap.load is not None
        c = self.config
        preds = [predict(s, snap.load, c.planner_ttft_slo_ms / 1e3, c.planner_tpot_slo_ms / 1e3)
                 for s in candidate_splits(num_workers)]
        top = max(self.score(p) for p in preds)
        near = [p for p in preds if self.score(p) * (1 + c.planner_margin) >= top]
        return min(near, key=lambda p: (p.utilization, str(p.split)))

    def better(self, best: Prediction, cur: Prediction) -> str:
        """Why a switch is worth it ("" if it is not): a score higher than the current split's by more than
        the margin and by more than MIN_GAIN_SHARE of the arrival rate (a split that already meets the
        targets is kept: a switch costs a drain); or, in slo
        mode, the current split is overloaded (its queues grow without bound, so it misses any target in
        time) and the best one has more capacity by more than the margin. The second matters when every
        split is overloaded: all predict no goodput, and goodput alone would never move."""
        m = self.config.planner_margin
        lam = cur.utilization * cur.capacity_rps if math.isfinite(cur.utilization) else 0.0  # the arrival rate
        if self.score(best) > self.score(cur) * (1 + m) + MIN_GAIN_SHARE * lam + 1e-9:
            return f"predicted {self.score(best):.2f} vs {self.score(cur):.2f}/s"
        if self.config.planner == "slo" and cur.utilization >= 1 and best.capacity_rps > cur.capacity_rps * (1 + m):
            return (f"current split overloaded (utilization {cur.utilization:.2f}): {best.split} has capacity "
                    f"{best.capacity_rps:.2f}/s vs {cur.capacity_rps:.2f}/s")
        return ""

    def decide(self, now: float, current: Split, snap: Snapshot) -> Decision:
        c = self.config
        if snap.load is None:
            return Decision(now, "hold", current, current, f"not enough evidence: {snap.num_arrivals} arrived and "
                            f"{snap.num_requests} finished in the last {c.planner_window_s:.0f} s (needs "
                            f"{c.planner_min_requests} of either)")
        best = self.best(current.num_workers, snap)
        cur = predict(current, snap.load, c.planner_ttft_slo_ms / 1e3, c.planner_tpot_slo_ms / 1e3)
        why = f"{c.planner} mode; load: {snap.describe()}; best {best.describe()}; current {cur.describe()}"
        if best.split == current:
            self._candidate, self._streak = None, 0
            return Decision(now, "hold", current, current, f"current split is the best ({why})")
        gain = self.better(best, cur)
        if not gain:
            if self._candidate == best.split and cur.utilization >= 1:
                # still overloaded, the same best split, its predicted edge just under the margin (the learnt
                # speeds of the first polls swing by that much): neither confirms nor cancels the streak
                return Decision(now, "hold", current, current,
                                f"gain of {best.split} below the {c.planner_margin:.0%} margin this time, current "
                                f"still overloaded: streak kept at {self._streak}/{c.planner_confirm} ({why})")
            self._candidate, self._streak = None, 0
            return Decision(now, "hold", current, current,
                            f"gain of {best.split} below the {c.planner_margin:.0%} margin ({why})")
        why = f"{gain}; {why}"
        if now - self.last_change_at < c.planner_hold_s:
            return Decision(now, "hold", current, current,
                            f"holding: changed {now - self.last_change_at:.0f} s ago (< {c.planner_hold_s:.0f} s); {why}")
        if self._candidate == best.split:
            self._streak += 1
        else:
            self._candidate, self._streak = best.split, 1
        if self._streak < c.planner_confirm:
            return Decision(now, "hold", current, current,
                            f"{best.split} best {self._streak}/{c.planner_confirm} times in a row; {why}")
        self._candidate, self._streak = None, 0
        return Decision(now, "switch", current, best.split, why)

    def scale_wish(self, now: float, current: Split, snap: Snapshot) -> Decision | None:
        """One worker more (best split's utilization over the scale-up bound) or fewer (still under the
        scale-down bound with one less); None otherwise."""
        c = self.config
        if snap.load is None or current.num_workers < 1:
            return None
        best = self.best(current.num_workers, snap)
        if best.utilization > c.planner_scale_up_utilization:
            more = self.best(current.num_workers + 1, snap)
            return Decision(now, "scale_up", current, more.split,
                            f"predicted utilization {best.utilization:.2f} > {c.planner_scale_up_utilization}: "
                            f"{more.describe()}")
        if current.num_workers > 1:
            fewer = self.best(current.num_workers - 1, snap)
            if fewer.utilization < c.planner_scale_down_utilization:
                return Decision(now, "scale_down", current, fewer.split,
                                f"with one worker less, utilization {fewer.utilization:.2f} < "
                                f"{c.planner_scale_down_utilization}: {fewer.describe()}")
        return None


def assign_roles(workers: list, target: Split, prefill_speed) -> list[tuple[object, int]]:
    """(worker, new role) for the workers that must switch to reach `target`, keeping as many as possible
    where they are; the fastest prefill workers (lowest `prefill_speed(worker)` s/token) take prefill
    slots. A target without prefill workers is met by decode workers as well as colocated ones (split_of).
    Order: prefill workers gaining decode first (they drain no decode work), then decode-capable
    ones, those becoming prefill last, so a decode-capable worker stays routable through every drain."""
    if not target.num_prefill:
        target = Split(0, 0, target.num_workers)
    needs = {pb.PREFILL: target.num_prefill, pb.DECODE: target.num_decode, pb.COLOCATED: target.num_colocated}
    by_speed = sorted(workers, key=lambda w: (prefill_speed(w), w.address))
    movers = []
    for w in by_speed:
        role = pb.COLOCATED if w.role == pb.DECODE and not target.num_prefill else w.role  # split_of's rule
        if needs.get(role, 0) > 0:
            needs[role] -= 1
        else:
            movers.append(w)
    plan = []
    for role in (pb.PREFILL, pb.DECODE, pb.COLOCATED):
        for _ in range(needs[role]):
            plan.append((movers.pop(0), role))
    return sorted(plan, key=lambda wr: (wr[1] == pb.PREFILL, wr[0].role != pb.PREFILL))


class Planner:
    """The router's planner loop (`--planner throughput|slo`)."""

    def __init__(self, config: PlannerConfig, registry, policy, calibration: StepModel | None = None) -> None:
        self.config = config
        self.registry = registry
        self.policy = policy
        self.calibration = calibration
        self.window = SignalWindow(config.planner_window_s, config.planner_min_requests)
        self.chooser = SplitChooser(config)
        self.decisions: deque[Decision] = deque(maxlen=200)
        self.num_decisions: dict[str, int] = {}
        self.last_snapshot: Snapshot | None = None
        self._task: asyncio.Task | None = None
        self._last_reason = ""
        self._last_hook_at = -math.inf

    # ---- signals ---------------------------------------------------------------------------------
    def observe(self, request: FinishedRequest) -> None:
        self.window.add(request)

    def observe_arrival(self, arrival: Arrival) -> None:
        self.window.arrive(arrival)

    # ---- the loop ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.planner_interval_s)
            try:
                await self.step()
            except Exception:  # noqa: BLE001 - the planner must outlive any one failure
                logger.exception("planner step failed")

    def workers(self) -> list:
        return [w for w in self.registry.workers.values() if w.healthy]

    def current_split(self) -> Split:
        return split_of(w.role for w in self.workers())

    async def step(self) -> Decision:
        now = time.monotonic()
        workers = self.workers()
        current = split_of(w.role for w in workers)
        decode_capable = [w for w in workers if w.role in (pb.DECODE, pb.COLOCATED)]
        batch = sum(w.stats.num_running for w in decode_capable) / max(1, len(decode_capable))
        snap = self.window.snapshot(now, self.policy.prefill_s_per_token, self.calibration, batch,
                                    measured_speeds(workers, self.policy),
                                    backlog_tokens=sum(w.queued_prompt_tokens for w in workers))
        self.last_snapshot = snap
        decision = self.chooser.decide(now, current, snap)
        self.record(decision)
        if decision.action == "switch":
            decision = await self.apply(decision, workers)
        wish = self.chooser.scale_wish(now, current, snap)
        if wish is not None and now - self._last_hook_at >= self.config.planner_hold_s:
            self._last_hook_at = now
            self.record(wish)
            await self.call_hook(wish)
        return decision

    def record(self, d: Decision) -> None:
        self.decisions.append(d)
        self.num_decisions[d.action] = self.num_decisions.get(d.action, 0) + 1
        if d.action != "hold" or d.reason.split(";")[0] != self._last_reason:
            logger.info("planner %s %s -> %s: %s", d.action, d.current, d.target, d.reason)
        else:
            logger.debug("planner %s %s: %s", d.action, d.current, d.reason)
        self._last_reason = d.reason.split(";")[0] if d.action == "hold" else ""

    async def apply(self, decision: Decision, workers: list) -> Decision:
        """Switch roles to reach decision.target. Every worker to switch must answer first: one that does
        not leaves the split unchanged (and the decision says so)."""
        plan = assign_roles(workers, decision.target, self.policy.s_per_token)
        for w, _ in plan:
            try:
                await w.control_stub.SetRole(pb.SetRoleRequest(role=w.role), timeout=2.0)  # same role: a no-op ping
            except grpc.aio.AioRpcError as exc:
                d = Decision(time.monotonic(), "unreachable", decision.current, decision.current,
                             f"cannot reach {w.worker_id or w.address} ({exc.code().name}: {exc.details()}): "
                             f"split unchanged at {decision.current}, wanted {decision.target}")
                self.record(d)
                return d
        for w, role in plan:
            old = w.role
            if role != pb.COLOCATED:  # a switch to colocated is widening: the worker does not drain
                self.registry.set_role(w.address, old, draining=True)  # routed nothing new from now
            try:
                await w.control_stub.SetRole(pb.SetRoleRequest(
                    role=role, drain_timeout_s=self.config.planner_drain_timeout_s,
                    reason=f"planner: {decision.current} -> {decision.target}"),
                    timeout=self.config.planner_drain_timeout_s + 10)
            except grpc.aio.AioRpcError as exc:
                self.registry.set_role(w.address, old, draining=False)
                now_split = split_of(x.role for x in self.workers())
                d = Decision(time.monotonic(), "switch_failed", decision.current, now_split,
                             f"{w.worker_id or w.address} -> {pb.WorkerRole.Name(role).lower()} failed "
                             f"({exc.code().name}: {exc.details()}); split now {now_split}")
                self.record(d)
                return d
            self.registry.set_role(w.address, role, draining=False)
        self.chooser.last_change_at = time.monotonic()
        d = Decision(time.monotonic(), "switched", decision.current, decision.target,
                     f"{len(plan)} role switches: " + ", ".join(f"{w.worker_id or w.address} -> "
                                                                 f"{pb.WorkerRole.Name(r).lower()}" for w, r in plan))
        self.record(d)
        return d

    async def call_hook(self, wish: Decision) -> None:
        """Tell the orchestrator what the planner wants (--planner-scale-hook); only logged without one."""
        cmd = self.config.planner_scale_hook
        if not cmd:
            return
        t = wish.target
        env = {**os.environ, "PDSERVE_PLANNER_WANT_PREFILL": str(t.num_prefill),
               "PDSERVE_PLANNER_WANT_DECODE": str(t.num_decode), "PDSERVE_PLANNER_WANT_COLOCATED": str(t.num_colocated),
               "PDSERVE_PLANNER_REASON": f"{wish.action}: {wish.reason}"}
        try:
            proc = await asyncio.create_subprocess_exec(*shlex.split(cmd), env=env, stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.STDOUT)
            out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
            logger.info("planner scale hook %s exited %s: %s", cmd, proc.returncode, out.decode(errors="replace")[-500:])
        except (OSError, asyncio.TimeoutError) as exc:
            logger.warning("planner scale hook %s failed: %s", cmd, exc)
