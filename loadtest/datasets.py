"""Builds the list of `BenchRequest`s a run sends: `random`, `shared-prefix` or `mooncake`.

Synthetic prompts are token ids from a seeded RNG; with prompt_format "text" they are decoded
(by the model's tokenizer when given), and the server's re-tokenisation may change lengths.
"""

from __future__ import annotations

import numpy as np

from .config import BenchConfig
from .mooncake import mooncake_requests
from .request import BenchRequest
from .tokens import TokenCodec


def build_requests(config: BenchConfig, codec: TokenCodec) -> list[BenchRequest]:
    """At most `num_prompts` requests, reproducible from `config.seed`."""
    if config.dataset == "random":
        return random_requests(config, codec)
    if config.dataset == "shared-prefix":
        return shared_prefix_requests(config, codec)
    if config.dataset == "mooncake":
        return mooncake_requests(config, codec)
    raise ValueError(f"unknown dataset {config.dataset!r}")


def sample_lengths(rng: np.random.Generator, mean_len: int, range_ratio: float, n: int) -> list[int]:
    """n integer lengths uniform in [mean_len * (1 - r), mean_len * (1 + r)], each >= 1."""
    low = max(1, int(np.floor(mean_len * (1 - range_ratio))))
    high = max(low, int(np.ceil(mean_len * (1 + range_ratio))))
    return rng.integers(low, high + 1, size=n).tolist()


def random_requests(config: BenchConfig, codec: TokenCodec) -> list[BenchRequest]:
    rng = np.random.default_rng(config.seed)
    n = config.num_prompts
    input_lens = sample_lengths(rng, config.random_input_len, config.random_range_ratio, n)
    output_lens = sample_lengths(rng, config.random_output_len, config.random_range_ratio, n)
    return [_make_request(config, codec, f"bench-{i}", codec.sample_ids(rng, input_lens[i]), output_lens[i])
            for i in range(n)]


def shared_prefix_requests(config: BenchConfig, codec: TokenCodec) -> list[BenchRequest]:
    """Requests in `prefix_groups` groups; a group's requests share a `prefix_len` system prompt,
    then each has its own `suffix_len` question. Groups are interleaved in a seeded order."""
    rng = np.random.default_rng(config.seed)
    n = config.num_prompts
    group_prefixes = [codec.sample_ids(rng, config.prefix_len) for _ in range(config.prefix_groups)]
    group_of_request = rng.permutation(np.arange(n) % config.prefix_groups).tolist()
    output_lens = sample_lengths(rng, config.random_output_len, config.random_range_ratio, n)
    return [_make_request(config, codec, f"bench-{i}",
                          group_prefixes[group_of_request[i]] + codec.sample_ids(rng, config.suffix_len),
                          output_lens[i])
            for i in range(n)]


def _make_request(config: BenchConfig, codec: TokenCodec, request_id: str, token_ids: list[int],
                  max_tokens: int) -> BenchRequest:
    if config.prompt_format == "text":
        text = codec.decode(token_ids)
        return BenchRequest(request_id, text, codec.count(text) or len(token_ids), max_tokens)
    return BenchRequest(request_id, token_ids, len(token_ids), max_tokens)
