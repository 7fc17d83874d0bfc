"""Synthetic datasets: random lengths in range and reproducible; shared-prefix groups share a prefix."""

from __future__ import annotations

from collections import Counter

from pdserve.loadtest.config import BenchConfig
from pdserve.loadtest.datasets import build_requests
from pdserve.loadtest.tokens import FIRST_ORDINARY_ID, TokenCodec


def test_random_lengths_in_range_and_reproducible() -> None:
    cfg = BenchConfig(num_prompts=50, random_input_len=100, random_output_len=20, random_range_ratio=0.5, seed=3)
    codec = TokenCodec(None, cfg.vocab_size)
    requests = build_requests(cfg, codec)
    assert len(requests) == 50
    assert all(50 <= r.prompt_len == len(r.prompt) <= 150 for r in requests)
    assert all(10 <= r.max_tokens <= 30 for r in requests)
    assert len({r.prompt_len for r in requests}) > 10
    assert all(FIRST_ORDINARY_ID <= t < cfg.vocab_size for r in requests for t in r.prompt)
    assert [r.prompt for r in requests] == [r.prompt for r in build_requests(cfg, codec)]
    assert len({r.request_id for r in requests}) == 50


def test_random_fixed_lengths_without_range() -> None:
    cfg = BenchConfig(num_prompts=5, random_input_len=7, random_output_len=3)
    requests = build_requests(cfg, TokenCodec(None, cfg.vocab_size))
    assert {(r.prompt_len, r.max_tokens) for r in requests} == {(7, 3)}


def test_shared_prefix_groups() -> None:
    cfg = BenchConfig(dataset="shared-prefix", num_prompts=12, prefix_groups=3, prefix_len=20, suffix_len=5)
    requests = build_requests(cfg, TokenCodec(None, cfg.vocab_size))
    prefixes = Counter(tuple(r.prompt[:20]) for r in requests)
    assert sorted(prefixes.values()) == [4, 4, 4]
    assert all(r.prompt_len == 25 for r in requests)
    assert len({tuple(r.prompt[20:]) for r in requests}) == 12
