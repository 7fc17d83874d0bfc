"""Mooncake trace replay: turns trace rows (timestamp, lengths, hash ids) into prompts.

Each hash id becomes one block of token ids drawn from an RNG seeded by (seed, hash id), so
equal hash ids give equal blocks and the trace's prefix sharing survives. Lengths and the
block size are scaled by `length_scale` (512-token blocks become 16-token blocks at 1/32).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .config import BenchConfig
from .request import BenchRequest
from .tokens import TokenCodec


@dataclass(frozen=True, slots=True)
class TraceRow:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def load_trace(path: str, start_s: float = 0.0, end_s: float | None = None, limit: int | None = None) -> list[TraceRow]:
    """Rows in arrival order whose timestamp (from the trace's first) lies in [start_s, end_s). A line
    that is not a trace row raises ValueError naming the file, the line number and what is wrong."""
    rows: list[TraceRow] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    d = json.loads(line)
                    rows.append(TraceRow(float(d["timestamp"]), int(d["input_length"]), int(d["output_length"]),
                                         tuple(int(h) for h in d["hash_ids"])))
                except (ValueError, KeyError, TypeError) as exc:
                    what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
                    raise ValueError(f"{path}:{lineno}: not a Mooncake trace row ({what}): {line.strip()[:80]!r}"
                                     ) from None
    rows.sort(key=lambda r: r.timestamp_ms)
    if not rows:
        return rows
    t0 = rows[0].timestamp_ms
    window = [r for r in rows if (r.timestamp_ms - t0) / 1000 >= start_s
              and (end_s is None or (r.timestamp_ms - t0) / 1000 < end_s)]
    return window[:limit] if limit is not None else window


def block_token_ids(hash_id: int, block_size: int, codec: TokenCodec, seed: int) -> list[int]:
    """The token ids of the block with this hash id: a pure function of (hash_id, block_size, seed)."""
    return codec.sample_ids(np.random.default_rng([seed, hash_id]), block_size)


def scaled_lengths(row: TraceRow, config: BenchConfig) -> tuple[int, int]:
    """(prompt tokens, max output tokens) of a row after scaling.

    The prompt is its whole blocks of `scaled_block_size` plus a last block holding the rest
    of round(input_length * length_scale), at least one token and at most a full block.
    The output is round(output_length * length_scale), at least 1, capped at max_output_len.
    """
    block_size = config.scaled_block_size
    num_blocks = len(row.hash_ids)
    target = round(row.input_length * config.length_scale)
    last = min(block_size, max(1, target - (num_blocks - 1) * block_size))
    output_len = max(1, round(row.output_length * config.length_scale))
    if config.max_output_len is not None:
        output_len = min(output_len, config.max_output_len)
    return (num_blocks - 1) * block_size + last, output_len


def mooncake_requests(config: BenchConfig, codec: TokenCodec) -> list[BenchRequest]:
    assert config.trace is not None
    rows = load_trace(config.trace, config.trace_start_s, config.trace_end_s, config.num_prompts)
    block_size = config.scaled_block_size
    hash_id_to_block: dict[int, list[int]] = {}  # local memo: blocks repeat across requests
    requests: list[BenchRequest] = []
    t0 = rows[0].timestamp_ms if rows else 0.0
    for i, row in enumerate(rows):
        if not row.hash_ids:
            continue
        prompt_len, output_len = scaled_lengths(row, config)
        token_ids: list[int] = []
        for h in row.hash_ids:
            if h not in hash_id_to_block:
                hash_id_to_block[h] = block_token_ids(h, block_size, codec, config.seed)
            token_ids.extend(hash_id_to_block[h])
        token_ids = token_ids[:prompt_len]
        prompt: list[int] | str = token_ids
        if config.prompt_format == "text":
            prompt = codec.decode(token_ids)
            prompt_len = codec.count(prompt) or prompt_len
        requests.append(BenchRequest(
            request_id=f"bench-{i}", prompt=prompt, prompt_len=prompt_len, max_tokens=output_len,
            arrival_offset_s=(row.timestamp_ms - t0) / 1000 * config.time_scale, hash_ids=row.hash_ids,
        ))
    return requests


def _leading_hits(r: BenchRequest, block_size: int, cached) -> int:
    """How many of r's lookup blocks are in `cached`, by the engine's rule: its first (prompt_len - 1) //
    block_size blocks (the last prompt token is always computed), stopping at the first miss."""
    n = 0
    for h in r.hash_ids[: (r.prompt_len - 1) // block_size]:
        if h not in cached:
            break
        n += 1
    return n


def ideal_hit_ratio(requests: list[BenchRequest], counted_ids: set[str], block_size: int,
                    capacity_blocks: int | None = None) -> float | None:
    """Prompt tokens an ideal prefix cache serves / prompt tokens, over the `counted_ids` requests,
    replaying all `requests` (those sent) in order: every one of them fills the cache.

    The cache holds whole blocks keyed by trace hash id (LRU at `capacity_blocks`, else unbounded),
    with the engine's rules: a request looks up its first (prompt_len - 1) // block_size blocks (the
    last prompt token is always computed), a block hits only while every block before it hit, and
    then its whole blocks (prompt_len // block_size) are cached. None without counted requests.
    """
    cache: OrderedDict[int, None] = OrderedDict()
    hit_tokens = prompt_tokens = 0
    for r in requests:
        assert r.hash_ids is not None, "ideal hit ratios need trace requests"
        num_hit = _leading_hits(r, block_size, cache)
        for h in r.hash_ids[: r.prompt_len // block_size]:
            cache[h] = None
            cache.move_to_end(h)
            if capacity_blocks is not None and len(cache) > capacity_blocks:
                cache.popitem(last=False)
        if r.request_id in counted_ids:
            hit_tokens += num_hit * block_size
            prompt_tokens += r.prompt_len
    return hit_tokens / prompt_tokens if prompt_tokens else None


@dataclass(frozen=True, slots=True)
class IdealMisses:
    """Prompt tokens the unbounded ideal serves from cache and the server did not, split by whether the
    server could have had them: each request's shortfall is charged to its first block the server missed."""

    in_flight_tokens: int  # no earlier request holding that block had its first token when this one started
    computed_tokens: int  # an earlier request holding it had its first token (prefill done) before this started


def ideal_misses(requests: list[BenchRequest], measured: dict[str, tuple[int, float, float | None]],
                 block_size: int) -> IdealMisses:
    """`requests` as sent (send order); `measured`: request id -> (cached tokens, start time, first-token
    time or None) of the counted requests, times on one clock. The ideal is `ideal_hit_ratio`'s, unbounded."""
    computed_at: dict[int, float] = {}  # hash id -> earliest first-token time of an earlier request holding it
    seen: set[int] = set()
    in_flight = computed = 0
    for r in requests:
        assert r.hash_ids is not None, "ideal misses need trace requests"
        num_ideal = _leading_hits(r, block_size, seen)
        m = measured.get(r.request_id)
        if m is not None:
            cached, started, first_token = m
            num_hit = min(num_ideal, cached // block_size)
            if num_hit < num_ideal:
                missed = (num_ideal - num_hit) * block_size
                if computed_at.get(r.hash_ids[num_hit], float("inf")) <= started:
                    computed += missed
                else:
                    in_flight += missed
        first_token = m[2] if m is not None else None
        for h in r.hash_ids[: r.prompt_len // block_size]:
            seen.add(h)
            if first_token is not None and first_token < computed_at.get(h, float("inf")):
                computed_at[h] = first_token
    return IdealMisses(in_flight, computed)
