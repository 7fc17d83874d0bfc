"""End-to-end runs of the harness against the stub OpenAI server in conftest.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pdserve.loadtest.config import BenchConfig
from pdserve.loadtest.metrics import CANCELLED
from pdserve.loadtest.report import format_summary
from pdserve.loadtest.runner import run_benchmark

STUB_MODEL = "stub-model"  # what the stub lists on /v1/models


def bench_config(server: Any, **kwargs: object) -> BenchConfig:
    defaults: dict = dict(base_url=server.base_url, num_prompts=12, request_rate=200.0, random_input_len=16,
                          random_output_len=5, max_duration_s=20.0, progress=False)
    defaults.update(kwargs)
    return BenchConfig(**defaults)


async def test_completions_run_counts_json_and_plots(stub_server: Any, tmp_path: Path) -> None:
    cfg = bench_config(stub_server, result_json=str(tmp_path / "out" / "result.json"),
                       plot_dir=str(tmp_path / "plots"), slo_ttft_ms=5000, slo_tpot_ms=5000)
    result = await run_benchmark(cfg)
    s = result.summary
    assert result.model == STUB_MODEL  # discovered from /v1/models
    assert (s.num_requests, s.num_sent, s.num_completed, s.num_failed, s.num_cancelled, s.num_not_sent) == \
        (12, 12, 12, 0, 0, 0)
    assert s.total_input_tokens == 12 * 16 and s.total_output_tokens == 12 * 5
    assert s.num_good == 12 and s.goodput == pytest.approx(s.request_throughput)
    assert s.latency["ttft"] is not None and s.latency["itl"].count == 12 * 4
    assert s.errors == {}

    bodies = stub_server.behaviour.bodies
    assert len(bodies) == 12
    assert all(b["model"] == STUB_MODEL and b["stream"] and b["ignore_eos"] for b in bodies)
    assert all(isinstance(b["prompt"], list) and len(b["prompt"]) == 16 for b in bodies)

    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert {"config", "model", "started_at", "summary", "timeline", "requests"} <= saved.keys()
    assert saved["config"]["num_prompts"] == 12 and saved["summary"]["num_completed"] == 12
    assert {"ttft", "tpot", "itl", "e2e"} <= saved["summary"]["latency"].keys()
    assert len(saved["requests"]) == 12
    record = saved["requests"][0]
    assert {"request_id", "success", "error_kind", "scheduled_s", "start_s", "prompt_len", "output_len",
            "ttft_ms", "tpot_ms", "e2e_ms", "itl_ms"} <= record.keys()
    assert record["output_len"] == 5 and len(record["itl_ms"]) == 4
    for name in ("latency_cdf.png", "throughput.png"):
        png = tmp_path / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    text = format_summary(result)
    assert "Goodput" in text and "P99 TTFT (ms)" in text


@pytest.mark.parametrize("stub_behaviour", [{"fail_every": 3}], indirect=True)
async def test_http_errors_counted_by_kind(stub_server: Any) -> None:
    result = await run_benchmark(bench_config(stub_server, num_prompts=9, max_concurrency=1))
    s = result.summary
    assert (s.num_sent, s.num_completed, s.num_failed) == (9, 6, 3)
    assert s.errors == {"http_503": 3}
    assert "http_503" in format_summary(result)


@pytest.mark.parametrize("stub_behaviour", [{"token_delay_s": 0.2}], indirect=True)
async def test_time_limit_cancels_in_flight_and_counts(stub_server: Any) -> None:
    cfg = bench_config(stub_server, num_prompts=6, random_output_len=50, arrival="constant", request_rate=4.0,
                       max_duration_s=0.6)
    result = await run_benchmark(cfg)
    s = result.summary
    assert s.num_completed == 0
    assert s.num_cancelled == s.num_sent >= 2
    assert s.num_not_sent == 6 - s.num_sent >= 2
    assert s.errors == {CANCELLED: s.num_sent}
    assert 0.6 <= s.duration_s < 2.0


@pytest.mark.parametrize("stub_behaviour", [{"token_delay_s": 0.2}], indirect=True)
async def test_requests_waiting_for_a_slot_are_not_sent(stub_server: Any) -> None:
    cfg = bench_config(stub_server, num_prompts=5, random_output_len=50, max_concurrency=2, max_duration_s=0.5)
    s = (await run_benchmark(cfg)).summary
    assert (s.num_sent, s.num_cancelled, s.num_not_sent) == (2, 2, 3)


async def test_chat_backend_with_tokenizer_counts(stub_server: Any, word_tokenizer_dir: Path) -> None:
    cfg = bench_config(stub_server, backend="openai-chat", tokenizer=str(word_tokenizer_dir), num_prompts=4,
                       max_concurrency=2, model="explicit-name", save_output_text=True)
    result = await run_benchmark(cfg)
    assert result.model == "explicit-name"
    assert result.summary.num_completed == 4
    assert result.summary.total_input_tokens == 4 * 16  # word-level: decode/encode keeps lengths
    assert result.summary.total_output_tokens == 4 * 5  # "t0 t1 t2 t3 t4 " counted by the tokenizer
    bodies = stub_server.behaviour.bodies
    assert all(isinstance(b["messages"][0]["content"], str) for b in bodies)
    assert result.records()[0]["output_text"] == "t0 t1 t2 t3 t4 "


async def test_mooncake_replay_against_stub(stub_server: Any, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps({"timestamp": i * 100, "input_length": 1000, "output_length": 96,
                                           "hash_ids": [0, 1 + i % 2]}) for i in range(6)))
    cfg = bench_config(stub_server, dataset="mooncake", trace=str(trace), time_scale=0.1, request_rate=float("inf"))
    result = await run_benchmark(cfg)
    assert result.summary.num_completed == 6 and result.summary.total_output_tokens == 6 * 3
    assert result.scheduled_offsets_s == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.04, 0.05])
    prompts = [b["prompt"] for b in stub_server.behaviour.bodies]
    assert len({tuple(p[:16]) for p in prompts}) == 1  # hash id 0 everywhere
    assert len({tuple(p[16:]) for p in prompts}) == 2  # hash ids 1 and 2

    # A finite rate rescales the trace instead: 5 gaps at 100 req/s span 0.05 s.
    rescaled = await run_benchmark(bench_config(stub_server, dataset="mooncake", trace=str(trace), request_rate=100.0))
    assert rescaled.scheduled_offsets_s == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.04, 0.05])


@pytest.mark.parametrize("stub_behaviour", [{"cache_block_size": 16}], indirect=True)
async def test_prefix_hits_from_usage_match_the_trace_ideal(stub_server: Any, tmp_path: Path) -> None:
    """A server that is itself an unbounded whole-block prefix cache measures exactly the trace's ideal."""
    trace = tmp_path / "trace.jsonl"
    rows = [{"timestamp": 10 * i, "input_length": 512 * (i % 3 + 1) + 100, "output_length": 64,
             "hash_ids": [0, *range(100 * (i % 4) + 1, 100 * (i % 4) + i % 3 + 2)]} for i in range(12)]
    trace.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "result.json"
    cfg = bench_config(stub_server, dataset="mooncake", trace=str(trace), max_concurrency=1, ideal_lru_blocks=2,
                       result_json=str(out))
    result = await run_benchmark(cfg)
    hits = result.summary.prefix_hits
    assert hits is not None and hits.num_reporting == 12
    assert hits.prompt_tokens == result.summary.total_input_tokens
    assert hits.cached_tokens == sum(r.usage_cached_tokens for r in result.results) > 0
    assert hits.hit_ratio == pytest.approx(hits.ideal_unbounded)
    assert hits.ideal_lru is not None and hits.ideal_lru < hits.ideal_unbounded and hits.ideal_lru_blocks == 2
    saved = json.loads(out.read_text())
    assert saved["summary"]["prefix_hits"]["hit_ratio"] == pytest.approx(hits.hit_ratio)
    assert sum(r["cached_tokens"] for r in saved["requests"]) == hits.cached_tokens
    text = format_summary(result)
    assert "Prefix-hit ratio" in text and "Trace ideal, unbounded cache" in text and "LRU 2 blocks" in text


async def test_no_cached_tokens_reported_means_no_ratio(stub_server: Any) -> None:
    result = await run_benchmark(bench_config(stub_server, num_prompts=3))
    hits = result.summary.prefix_hits
    assert hits is not None and hits.num_reporting == 0 and hits.hit_ratio is None
    assert "Prefix-hit ratio" not in format_summary(result)
