"""BenchConfig checks and the values it resolves."""

from __future__ import annotations

import math

import pytest

from pdserve.loadtest.config import BenchConfig


@pytest.mark.parametrize("kwargs", [
    {"num_prompts": 0},
    {"max_duration_s": 0},
    {"request_rate": -1.0},
    {"backend": "grpc-nope"},
    {"dataset": "sharegpt"},
    {"base_url": "127.0.0.1:8000"},
    {"random_range_ratio": 1.0},
    {"length_scale": 1 / 3},  # 512/3 tokens is not a whole block
    {"arrival": "trace"},  # needs mooncake
    {"arrival": "constant"},  # needs a finite rate
    {"backend": "openai-chat", "prompt_format": "tokens"},
    {"percentiles": (50, 101)},
    {"slo_ttft_ms": 0},
    {"max_concurrency": 0},
    {"dataset": "mooncake", "trace": "/nonexistent/trace.jsonl"},
    {"tokenizer": "/nonexistent"},
    {"trace_start_s": 5.0, "trace_end_s": 1.0},
    {"dataset": "mooncake", "time_scale": 0.5, "request_rate": 2.0},  # both rescale the trace
])
def test_invalid_values_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        BenchConfig(**kwargs)


def test_resolved_defaults() -> None:
    cfg = BenchConfig(base_url="http://127.0.0.1:9000/")
    assert cfg.base_url == "http://127.0.0.1:9000"
    assert cfg.arrival == "poisson" and cfg.prompt_format == "tokens"
    assert math.isinf(cfg.request_rate) and cfg.to_dict()["request_rate"] is None
    assert BenchConfig(burstiness=0.5).arrival == "gamma"
    assert BenchConfig(backend="openai-chat").prompt_format == "text"
