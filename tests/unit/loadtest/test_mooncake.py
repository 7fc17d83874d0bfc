"""Mooncake trace replay: equal hash ids give equal token blocks, lengths scale as documented."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pdserve.loadtest.config import DEFAULT_TRACE_PATH, BenchConfig
from pdserve.loadtest.mooncake import (IdealMisses, block_token_ids, ideal_hit_ratio, ideal_misses, load_trace,
                                      mooncake_requests, scaled_lengths)
from pdserve.loadtest.tokens import TokenCodec

ROWS = [
    {"timestamp": 0, "input_length": 1200, "output_length": 100, "hash_ids": [1, 2, 3]},
    {"timestamp": 500, "input_length": 1100, "output_length": 64, "hash_ids": [1, 2, 4]},
    {"timestamp": 2000, "input_length": 700, "output_length": 3, "hash_ids": [5, 6]},
]


@pytest.fixture
def trace_path(tmp_path: Path) -> str:
    path = tmp_path / "trace.jsonl"
    # Out of order on disk: the loader sorts by timestamp.
    path.write_text("\n".join(json.dumps(r) for r in (ROWS[1], ROWS[0], ROWS[2])) + "\n\n")
    return str(path)


def config(trace: str, **kwargs: object) -> BenchConfig:
    return BenchConfig(dataset="mooncake", trace=trace, **kwargs)


def test_equal_hash_ids_give_equal_blocks() -> None:
    codec = TokenCodec(None, vocab_size=1000)
    assert block_token_ids(7, 16, codec, seed=0) == block_token_ids(7, 16, TokenCodec(None, 1000), seed=0)
    assert block_token_ids(7, 16, codec, seed=0) != block_token_ids(8, 16, codec, seed=0)
    assert block_token_ids(7, 16, codec, seed=0) != block_token_ids(7, 16, codec, seed=1)
    assert len(block_token_ids(7, 16, codec, seed=0)) == 16


def test_prompts_share_exactly_the_shared_blocks(trace_path: str) -> None:
    cfg = config(trace_path)
    codec = TokenCodec(None, cfg.vocab_size)
    a, b, c = mooncake_requests(cfg, codec)
    assert isinstance(a.prompt, list) and isinstance(b.prompt, list) and isinstance(c.prompt, list)
    assert a.prompt[:32] == b.prompt[:32]  # hash ids 1, 2 shared
    assert a.prompt[:16] == block_token_ids(1, 16, codec, cfg.seed)
    assert a.prompt[32:] == block_token_ids(3, 16, codec, cfg.seed)[:6]
    assert b.prompt[32:] == block_token_ids(4, 16, codec, cfg.seed)[:2]
    assert c.prompt[:16] != a.prompt[:16]


def test_lengths_scaled_as_documented(trace_path: str) -> None:
    cfg = config(trace_path)
    assert cfg.scaled_block_size == 16  # 512 * 1/32
    requests = mooncake_requests(cfg, TokenCodec(None, cfg.vocab_size))
    # prompt: round(input * 1/32) -> 1200: 38, 1100: 34, 700: 22; output: round(output / 32), at least 1
    assert [r.prompt_len for r in requests] == [38, 34, 22]
    assert [len(r.prompt) for r in requests] == [38, 34, 22]
    assert [r.max_tokens for r in requests] == [3, 2, 1]
    assert [r.arrival_offset_s for r in requests] == [0.0, 0.5, 2.0]

    capped = mooncake_requests(config(trace_path, max_output_len=2, time_scale=0.1), TokenCodec(None, 1000))
    assert [r.max_tokens for r in capped] == [2, 2, 1]
    assert [r.arrival_offset_s for r in capped] == pytest.approx([0.0, 0.05, 0.2])

    # 1/16: 32-token blocks; 1200/16 = 75 = 2 * 32 + 11.
    half = mooncake_requests(config(trace_path, length_scale=1 / 16), TokenCodec(None, 1000))
    assert half[0].prompt_len == 75 and half[0].max_tokens == 6


def test_window_and_first_n(trace_path: str) -> None:
    window = mooncake_requests(config(trace_path, trace_start_s=0.4), TokenCodec(None, 1000))
    assert [r.prompt_len for r in window] == [34, 22]
    assert [r.arrival_offset_s for r in window] == [0.0, 1.5]  # rebased to the window's first request
    assert len(load_trace(trace_path, end_s=1.0)) == 2
    assert len(mooncake_requests(config(trace_path, num_prompts=1), TokenCodec(None, 1000))) == 1


def test_ideal_hit_ratio_follows_the_engine_rules(trace_path: str) -> None:
    requests = mooncake_requests(config(trace_path), TokenCodec(None, 1000))  # 38, 34, 22 tokens
    every = {r.request_id for r in requests}
    # the second request finds hash ids 1, 2 (two whole blocks of the first); the third shares nothing
    assert ideal_hit_ratio(requests, every, 16) == pytest.approx(32 / (38 + 34 + 22))
    # counted over the second request only (the first still fills the cache)
    assert ideal_hit_ratio(requests, {"bench-1"}, 16) == pytest.approx(32 / 34)
    # an LRU of one block keeps only hash id 2: the second request misses its first block
    assert ideal_hit_ratio(requests, every, 16, capacity_blocks=1) == 0.0
    assert ideal_hit_ratio(requests, every, 16, capacity_blocks=2) == pytest.approx(32 / 94)
    assert ideal_hit_ratio(requests, set(), 16) is None
    # a prompt of exactly two whole blocks looks up only the first: its last token is computed
    two_blocks = dataclasses.replace(requests[1], request_id="again", prompt_len=32)
    assert ideal_hit_ratio([requests[0], two_blocks], {"again"}, 16) == pytest.approx(16 / 32)


def test_ideal_misses_say_whether_the_prefix_was_computed_yet(trace_path: str) -> None:
    requests = mooncake_requests(config(trace_path), TokenCodec(None, 1000))  # bench-1 ideally hits 2 blocks
    # bench-1 started after bench-0's first token and got one of its two ideal blocks: 16 tokens lost
    measured = {"bench-0": (0, 0.0, 1.0), "bench-1": (16, 2.0, 3.0), "bench-2": (0, 2.0, 3.0)}
    assert ideal_misses(requests, measured, 16) == IdealMisses(in_flight_tokens=0, computed_tokens=16)
    # bench-1 started before bench-0's prefill finished: both blocks were still in flight
    measured["bench-1"] = (0, 0.5, 3.0)
    assert ideal_misses(requests, measured, 16) == IdealMisses(in_flight_tokens=32, computed_tokens=0)
    # a full hit misses nothing; an uncounted request still fills the ideal (as in ideal_hit_ratio)
    measured["bench-1"] = (32, 0.5, 3.0)
    assert ideal_misses(requests, measured, 16) == IdealMisses(0, 0)
    del measured["bench-0"]
    measured["bench-1"] = (0, 2.0, 3.0)
    assert ideal_misses(requests, measured, 16) == IdealMisses(in_flight_tokens=32, computed_tokens=0)


def test_text_prompts(trace_path: str) -> None:
    requests = mooncake_requests(config(trace_path, prompt_format="text"), TokenCodec(None, 1000))
    assert all(isinstance(r.prompt, str) and r.prompt for r in requests)
    assert requests[0].prompt.split()[:32] == requests[1].prompt.split()[:32]


@pytest.mark.skipif(not DEFAULT_TRACE_PATH.exists(), reason="shared Mooncake trace not present")
def test_real_trace_prefix_sharing_and_lengths() -> None:
    cfg = BenchConfig(dataset="mooncake", num_prompts=300)  # the default trace path
    codec = TokenCodec(None, cfg.vocab_size)
    rows = load_trace(cfg.trace, limit=300)
    requests = mooncake_requests(cfg, codec)
    assert len(requests) == 300
    block_of_hash: dict[int, list[int]] = {}
    for row, req in zip(rows, requests):
        expected_len, expected_out = scaled_lengths(row, cfg)
        assert req.prompt_len == len(req.prompt) == expected_len
        assert (len(row.hash_ids) - 1) * 16 < expected_len <= len(row.hash_ids) * 16
        assert req.max_tokens == expected_out
        for j, h in enumerate(row.hash_ids[:-1]):  # full blocks
            block = req.prompt[j * 16:(j + 1) * 16]
            assert block_of_hash.setdefault(h, block) == block
    # every conversation starts with the trace's shared block 0
    assert len({tuple(r.prompt[:16]) for r in requests}) == 1
