"""The cluster simulator (planner/simulator.py) runs the real RoutingPolicy and planner decision:
every request finishes on every split, remote prefills move KV and local ones do not, repeated
prefixes hit, the planner switches roles in the loop, slower workers are slower, and a malformed
trace line is named (loadtest/mooncake.py)."""

from __future__ import annotations

import pytest

from pdserve.planner.config import PlannerConfig
from pdserve.planner.model import Split
from pdserve.planner.simulator import Calibration, SimRequest, Simulation
from pdserve.router.config import RouterConfig


def requests(n: int, prompt_len: int, output_len: int, rate: float, shared_blocks: int = 0) -> list[SimRequest]:
    out = []
    for i in range(n):
        blocks = prompt_len // 16
        hashes = tuple(b"s%d" % j if j < shared_blocks else b"r%d-%d" % (i, j) for j in range(blocks))
        out.append(SimRequest(f"r{i}", i / rate, prompt_len, output_len, hashes))
    return out


ROUTER = RouterConfig()


def test_every_request_finishes_on_every_split_and_routes_as_the_policy_says():
    reqs = requests(60, prompt_len=512, output_len=16, rate=10)
    coloc = Simulation(reqs, Split(0, 0, 2), Calibration(), ROUTER).run()
    split = Simulation(reqs, Split(1, 1), Calibration(), ROUTER).run()
    assert coloc.num_finished == split.num_finished == 60
    assert coloc.local_prefill_share == 1.0 and coloc.kv_bytes_moved == 0
    assert split.local_prefill_share == 0.0 and split.kv_bytes_moved == 60 * 512 * Calibration().kv_bytes_per_token
    assert coloc.ttft_s["p50"] > 0 and split.tpot_s["p50"] > 0


def test_shared_prefixes_hit_and_goodput_counts_the_slo():
    reqs = requests(40, prompt_len=512, output_len=8, rate=5, shared_blocks=24)
    r = Simulation(reqs, Split(1, 1), Calibration(), ROUTER, slo_tpot_s=1e-6).run()
    assert r.prefix_hit_ratio > 0.6 and r.goodput_rps == 0.0  # nobody meets a 1 us TPOT
    r = Simulation(reqs, Split(1, 1), Calibration(), ROUTER, slo_tpot_s=10.0).run()
    assert r.goodput_rps == pytest.approx(r.throughput_rps)


def test_the_planner_switches_roles_in_the_loop():
    reqs = requests(400, prompt_len=32, output_len=128, rate=12)
    planner = PlannerConfig(planner="slo", planner_interval_s=1, planner_window_s=5, planner_hold_s=2,
                            planner_tpot_slo_ms=20)
    r = Simulation(reqs, Split(1, 1), Calibration(), ROUTER, planner, slo_tpot_s=0.02).run()
    assert r.num_finished == 400 and r.final_split == "2 colocated"
    assert any(d[1] == "switched" for d in r.decisions)


def test_slower_workers_and_shared_cores_are_slower():
    reqs = requests(30, prompt_len=512, output_len=8, rate=2)
    fast = Simulation(reqs, Split(0, 0, 2), Calibration(), ROUTER).run()
    slow = Simulation(reqs, Split(0, 0, 2), Calibration(), ROUTER, speed_factors=[2.0]).run()
    assert slow.ttft_s["p50"] > 1.5 * fast.ttft_s["p50"]
    busy = requests(30, prompt_len=512, output_len=8, rate=50)
    own = Simulation(busy, Split(0, 0, 4), Calibration(), ROUTER).run()
    shared = Simulation(busy, Split(0, 0, 4), Calibration(), ROUTER, num_cores=1).run()
    assert shared.ttft_s["p90"] > own.ttft_s["p90"]


def test_serving_overheads_and_outside_load_slow_the_simulated_workers():
    from dataclasses import replace

    reqs = requests(30, prompt_len=128, output_len=32, rate=5)
    base = Simulation(reqs, Split(0, 0, 2), Calibration(), ROUTER, num_cores=2).run()
    overhead = replace(Calibration(), decode_overhead_s=2e-3, decode_overhead_per_seq_s=1e-3)
    slower = Simulation(reqs, Split(0, 0, 2), overhead, ROUTER, num_cores=2).run()
    assert slower.tpot_s["p50"] > base.tpot_s["p50"] + 2e-3  # each decode step carries the serving stack's cost
    crowded = Simulation(reqs, Split(0, 0, 2), Calibration(), ROUTER, num_cores=2, outside_runnable=4).run()
    assert crowded.tpot_s["p50"] > 2 * base.tpot_s["p50"]  # 2 cores shared with 4 outside threads: >= 3x a step
    frontend = replace(Calibration(), frontend_cpu_s_per_token=5e-3)  # 160 tokens/s x 5 ms: ~0.8 of a core
    busy = Simulation(reqs, Split(0, 0, 2), frontend, ROUTER, num_cores=1).run()
    alone = Simulation(reqs, Split(0, 0, 2), Calibration(), ROUTER, num_cores=1).run()
    assert busy.tpot_s["p50"] > alone.tpot_s["p50"]


def test_the_policy_learns_simulated_worker_speeds_from_their_step_counters():
    reqs = requests(80, prompt_len=512, output_len=4, rate=40)
    sim = Simulation(reqs, Split(2, 1), Calibration(), ROUTER, speed_factors=[1.0, 2.0, 1.0])
    r = sim.run()
    assert r.num_finished == 80
    fast, slow = sim.workers[0], sim.workers[1]  # both prefill; w1 twice as slow
    assert slow.speed.prefill_s_per_token == pytest.approx(2 * fast.speed.prefill_s_per_token, rel=0.2)
    assert fast.step_times.prefill_step_tokens > 1.5 * slow.step_times.prefill_step_tokens


def test_a_malformed_trace_line_is_named(tmp_path):
    from pdserve.loadtest.mooncake import load_trace

    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1]}\n'
                    '{"timestamp": 1, "input_length": 10}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:2: not a Mooncake trace row \(missing field 'output_length'\)"):
        load_trace(str(path))


def test_pdserve_simulate_prints_every_split_and_writes_results_and_plots(tmp_path, capsys):
    import json

    from pdserve.cli import main

    rc = main(["simulate", "--workers", "3", "--dataset", "random", "--num-prompts", "40", "--request-rate", "5",
               "--random-input-len", "128", "--random-output-len", "16", "--slo-tpot-ms", "50",
               "--out-dir", str(tmp_path), "--planner-window-s", "5", "--planner-min-requests", "4"])
    out = capsys.readouterr().out
    assert rc == 0
    for split in ("3 colocated", "1P:2D", "2P:1D"):
        assert f"| {split} | off | 40/40 |" in out
    assert "| slo |" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 4 and (tmp_path / "simulate_splits.png").stat().st_size > 0


def test_the_remote_prefill_paths_step_factor_and_overhead():
    from dataclasses import replace

    reqs = requests(20, prompt_len=256, output_len=16, rate=2)
    kv_out = replace(Calibration(), remote_prefill_step_factor=1.3)  # a prefill worker's steps send KV
    for split, slower in ((Split(1, 1), True), (Split(0, 0, 2), False)):
        base = Simulation(reqs, split, Calibration(), ROUTER).run()
        more = Simulation(reqs, split, kv_out, ROUTER).run()
        assert (more.ttft_s["p50"] > 1.15 * base.ttft_s["p50"]) == slower
        assert more.tpot_s["p50"] == pytest.approx(base.tpot_s["p50"], rel=0.05)  # decode steps as before
    over = replace(Calibration(), remote_prefill_overhead_s=0.02)
    for split, extra in ((Split(1, 1), 0.02), (Split(0, 0, 2), 0.0)):
        base = Simulation(reqs, split, Calibration(), ROUTER).run()
        more = Simulation(reqs, split, over, ROUTER).run()
        assert more.ttft_s["p50"] - base.ttft_s["p50"] == pytest.approx(extra, abs=2e-3)


def test_the_served_prefill_factor_slows_prompt_tokens_only():
    reqs = requests(20, prompt_len=256, output_len=16, rate=4)
    base = Simulation(reqs, Split(0, 0, 1), Calibration(), ROUTER)
    base.run()
    slow = Simulation(reqs, Split(0, 0, 1), Calibration(serving_prefill_factor=2.0), ROUTER)
    slow.run()
    (b,), (s,) = [w.step_times for w in base.workers], [w.step_times for w in slow.workers]
    assert s.prefill_step_seconds > 1.6 * b.prefill_step_seconds
    assert s.decode_step_seconds / s.num_decode_steps == pytest.approx(b.decode_step_seconds / b.num_decode_steps,
                                                                       rel=0.05)


@pytest.mark.parametrize("split", [Split(1, 1), Split(0, 0, 2)])
def test_step_factors_fitted_on_a_run_recover_the_served_step(split):
    """fit_step_factors: a 'real' run whose steps cost 1.7x the engine alone (prompt tokens 1.3x more) is
    reproduced from its step counters: the fit finds both factors, and a simulation with them predicts another
    run of that configuration (other requests) as the truth does."""
    from pdserve.planner.calibrate import fit_step_factors, step_summary

    truth = Calibration(serving_step_factor=1.7, serving_prefill_factor=1.3)
    calib = requests(60, prompt_len=256, output_len=32, rate=6)
    real = Simulation(calib, split, truth, ROUTER, num_cores=2)
    real.run()
    measured = step_summary([w.step_times for w in real.workers])
    fitted, history = fit_step_factors(calib, split, Calibration(), ROUTER, measured, num_cores=2)
    assert fitted.serving_step_factor == pytest.approx(1.7, rel=0.1)
    assert fitted.serving_prefill_factor == pytest.approx(1.3, rel=0.1)
    assert len(history) == 4 and history[0]["serving_step_factor"] == 1.0
    other = requests(60, prompt_len=320, output_len=24, rate=5)
    want = Simulation(other, split, truth, ROUTER, num_cores=2).run()
    got = Simulation(other, split, fitted, ROUTER, num_cores=2).run()
    assert got.ttft_s["p50"] == pytest.approx(want.ttft_s["p50"], rel=0.1)
    assert got.tpot_s["p50"] == pytest.approx(want.tpot_s["p50"], rel=0.1)
