"""PlannerConfig: every setting of the planner (a mode of the router: `pdserve router --planner slo`)."""

from __future__ import annotations

from dataclasses import dataclass, field


def _h(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    planner: str = field(default="off", metadata=_h(
        "set the prefill/decode split from live load: off (the split stays as started), throughput (the split "
        "with the most predicted capacity: all colocated unless pools differ in speed), slo (the split with the "
        "most predicted goodput under --planner-ttft-slo-ms and --planner-tpot-slo-ms)",
        choices=["off", "throughput", "slo"]))
    planner_interval_s: float = field(default=2.0, metadata=_h("how often the planner looks at the signals"))
    planner_window_s: float = field(default=30.0, metadata=_h(
        "the planner's signals are the requests admitted and finished in the last this many seconds"))
    planner_min_requests: int = field(default=8, metadata=_h(
        "fewer requests than this in the window (admitted or finished, whichever is more): no decision "
        "(not enough evidence)"))
    planner_hold_s: float = field(default=15.0, metadata=_h(
        "hysteresis: after a change the split holds at least this long"))
    planner_confirm: int = field(default=2, metadata=_h(
        "hysteresis: a new split must be the best this many evaluations in a row"))
    planner_margin: float = field(default=0.1, metadata=_h(
        "hysteresis: a new split must beat the current one's predicted score by this fraction"))
    planner_ttft_slo_ms: float = field(default=1000.0, metadata=_h("slo mode: the time-to-first-token target"))
    planner_tpot_slo_ms: float = field(default=50.0, metadata=_h("slo mode: the time-per-output-token target"))
    planner_drain_timeout_s: float = field(default=60.0, metadata=_h(
        "bound on each worker's drain when the planner switches its role"))
    planner_scale_hook: str = field(default="", metadata=_h(
        "command run (no shell) when the planner wants more or fewer workers than it has, with "
        "PDSERVE_PLANNER_WANT_{PREFILL,DECODE,COLOCATED} and PDSERVE_PLANNER_REASON in its environment "
        "(deploy/k8s/planner-scale-hook.sh scales the Deployments); empty: only logged", metavar="CMD"))
    planner_scale_up_utilization: float = field(default=0.85, metadata=_h(
        "ask the hook for one more worker when the best split's predicted bottleneck utilization is above this"))
    planner_scale_down_utilization: float = field(default=0.3, metadata=_h(
        "... and for one fewer when it would stay below this with one worker less"))

    def __post_init__(self) -> None:
        if self.planner_interval_s <= 0 or self.planner_window_s <= 0 or self.planner_drain_timeout_s <= 0:
            raise ValueError("planner_interval_s, planner_window_s and planner_drain_timeout_s must be > 0")
        if self.planner_min_requests < 1 or self.planner_confirm < 1:
            raise ValueError("planner_min_requests and planner_confirm must be >= 1")
        if self.planner_hold_s < 0 or self.planner_margin < 0:
            raise ValueError("planner_hold_s and planner_margin must be >= 0")
        if self.planner_ttft_slo_ms <= 0 or self.planner_tpot_slo_ms <= 0:
            raise ValueError("planner_ttft_slo_ms and planner_tpot_slo_ms must be > 0")
        if not 0 < self.planner_scale_down_utilization < self.planner_scale_up_utilization <= 1:
            raise ValueError("need 0 < planner_scale_down_utilization < planner_scale_up_utilization <= 1")
