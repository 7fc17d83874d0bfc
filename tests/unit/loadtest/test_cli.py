"""`pdserve bench` flags -> BenchConfig, and a CLI sweep against the stub server."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from pdserve.loadtest import cli


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pdserve bench")
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_flags_map_to_config_fields() -> None:
    cfg = cli.config_from_args(parse(["--length-scale", "1/16", "--no-ignore-eos", "--percentiles", "50,95",
                                      "--extra-body", '{"top_k": 1}', "--request-rate", "inf"]))
    assert cfg.length_scale == 1 / 16 and cfg.scaled_block_size == 32
    assert cfg.ignore_eos is False and cfg.percentiles == (50.0, 95.0) and cfg.extra_body == {"top_k": 1}


def test_bad_values_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(parse(["--num-prompts", "0"])) == 2
    assert "num_prompts" in capsys.readouterr().err
    assert cli.run(parse(["--sweep", "1,0"])) == 2


def test_unreachable_server_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    # Port 9 (discard) on loopback: nothing listens, the model lookup fails fast.
    assert cli.run(parse(["--base-url", "http://127.0.0.1:9", "--no-progress"])) == 1
    assert "pdserve bench:" in capsys.readouterr().err


def test_sweep_prints_table_and_writes_plots(stub_server: Any, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(["--base-url", stub_server.base_url, "--num-prompts", "4", "--random-input-len", "8",
                  "--random-output-len", "3", "--sweep", "50,100", "--slo-ttft-ms", "5000", "--no-progress",
                  "--result-json", str(tmp_path / "sweep.json"), "--plot-dir", str(tmp_path / "plots")])
    assert cli.run(args) == 0
    out = capsys.readouterr().out
    assert out.count("Serving Benchmark Result") == 2
    assert "goodput" in out and "TTFT p99" in out
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["sweep"] == [50.0, 100.0] and len(saved["runs"]) == 2
    assert all(run["summary"]["num_completed"] == 4 for run in saved["runs"])
    assert (tmp_path / "plots" / "goodput_vs_rate.png").stat().st_size > 0
    assert (tmp_path / "plots" / "rate_50" / "latency_cdf.png").stat().st_size > 0
