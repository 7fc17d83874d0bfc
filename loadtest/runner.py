"""Drives a run: builds the requests, sends them on schedule under the run's bounds, collects.

`run_benchmark(config)` is the Python API behind `pdserve bench`; `run_sweep` repeats it over
request rates. Scheduling and cancellation live here; wire formats live in `backends`,
statistics in `metrics`, files in `report`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pdserve.errors import NotFound

from .arrivals import arrival_offsets
from .backends import BACKENDS, Backend
from .config import BenchConfig
from .datasets import build_requests
from .metrics import CANCELLED, SLO, PrefixHits, Summary, summarize, throughput_timeline
from .mooncake import ideal_hit_ratio, ideal_misses
from .request import BenchRequest, RequestResult
from .server_metrics import scrape_settled_spec_counters, scrape_spec_counters, spec_decode_delta
from .tokens import TokenCodec

logger = logging.getLogger(__name__)


@dataclass
class BenchResult:
    config: BenchConfig
    model: str
    started_at: str  # ISO 8601, UTC
    t0: float  # perf_counter at the run's start; record times are offsets from it
    requests: list[BenchRequest]
    scheduled_offsets_s: list[float]
    results: list[RequestResult]  # one per sent request (cancelled ones included), in send order
    summary: Summary
    timeline: dict[str, list[float]] = field(default_factory=dict)

    def records(self) -> list[dict[str, Any]]:
        by_id = {req.request_id: (req, offset) for req, offset in zip(self.requests, self.scheduled_offsets_s)}
        rows = []
        for r in self.results:
            req, offset = by_id[r.request_id]
            row = {
                "request_id": r.request_id,
                "success": r.success,
                "error_kind": r.error_kind,
                "error": r.error,
                "scheduled_s": offset,
                "start_s": r.start_time - self.t0,
                "end_s": r.end_time - self.t0 if r.end_time else None,
                "prompt_len": r.prompt_len,
                "max_tokens": req.max_tokens,
                "output_len": r.output_len,
                "cached_tokens": r.usage_cached_tokens,
                "ttft_ms": _ms(r.ttft_s),
                "tpot_ms": _ms(r.tpot_s),
                "e2e_ms": _ms(r.e2e_s),
                "itl_ms": [gap * 1000 for gap in r.itl_s],
            }
            if self.config.save_output_text:
                row["output_text"] = r.output_text
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "model": self.model,
            "started_at": self.started_at,
            "summary": self.summary.to_dict(),
            "timeline": self.timeline,
            "requests": self.records(),
        }


async def run_benchmark(config: BenchConfig, backend: Backend | None = None) -> BenchResult:
    """One bounded run; writes `config.result_json` and plots to `config.plot_dir` when set.

    `backend` overrides the one named by `config.backend` (it is opened and closed here)."""
    codec = await asyncio.to_thread(TokenCodec, config.tokenizer, config.vocab_size)
    requests = await asyncio.to_thread(build_requests, config, codec)
    trace_offsets = [r.arrival_offset_s or 0.0 for r in requests] if config.arrival == "trace" else None
    offsets = arrival_offsets(config.arrival, len(requests), config.request_rate, config.burstiness,
                              config.seed, trace_offsets)
    backend = backend if backend is not None else BACKENDS[config.backend](config)
    async with backend:
        if backend.model is None:
            models = await backend.list_models()
            if not models:
                raise NotFound(f"{config.base_url} lists no models; pass --model")
            backend.model = models[0]
        started_at = datetime.now(timezone.utc).isoformat()
        spec_before = await scrape_spec_counters(config.base_url)
        t0, results, duration_s = await _send_all(config, backend, requests, offsets)
        spec_after = await scrape_settled_spec_counters(config.base_url) if spec_before is not None else None
    for r in results:
        _fill_token_counts(r, config, codec, type(backend).exact_token_counts)
    summary = summarize(results, len(requests), duration_s,
                        SLO(config.slo_ttft_ms, config.slo_tpot_ms, config.slo_e2e_ms), config.percentiles)
    if config.dataset == "mooncake" and summary.prefix_hits is not None:
        _fill_ideal_hits(summary.prefix_hits, config, requests, results)
    summary.spec_decode = spec_decode_delta(spec_before, spec_after)
    result = BenchResult(config, backend.model, started_at, t0, requests, offsets, results, summary,
                         throughput_timeline(results, t0, duration_s, _timeline_bin_s(duration_s)))
    await asyncio.to_thread(_write_outputs, result)
    return result


async def run_sweep(config: BenchConfig, request_rates: list[float]) -> list[BenchResult]:
    """`run_benchmark` once per rate; per-rate plots go to plot_dir/rate_<r>/, and the sweep's
    JSON (every run) to `config.result_json`, its goodput-vs-rate plot to `config.plot_dir`."""
    from . import report

    runs = []
    for rate in request_rates:
        plot_dir = str(Path(config.plot_dir) / f"rate_{rate:g}") if config.plot_dir else None
        run_config = dataclasses.replace(config, request_rate=rate, result_json=None, plot_dir=plot_dir)
        logger.info("sweep: request rate %g/s", rate)
        runs.append(await run_benchmark(run_config))
    if config.result_json:
        await asyncio.to_thread(report.write_sweep_json, runs, config.result_json)
    if config.plot_dir:
        await asyncio.to_thread(report.plot_sweep, runs, config.plot_dir)
    return runs


async def _send_all(config: BenchConfig, backend: Backend, requests: list[BenchRequest],
                    offsets: list[float]) -> tuple[float, list[RequestResult], float]:
    """Sends on schedule until done or `max_duration_s`; returns (t0, results, duration_s)."""
    from tqdm.auto import tqdm

    semaphore = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    start_times: dict[str, float] = {}  # request_id -> perf_counter when handed to the backend
    tasks: list[asyncio.Task[RequestResult]] = []
    num_output_chunks = 0
    progress = tqdm(total=len(requests), disable=not config.progress, unit="req", desc="bench")

    def on_token(num_tokens: int) -> None:
        nonlocal num_output_chunks
        num_output_chunks += num_tokens

    async def send(request: BenchRequest) -> RequestResult:
        start_times[request.request_id] = time.perf_counter()
        try:
            return await backend.send(request, on_token)
        finally:
            progress.update(1)

    async def send_when_allowed(request: BenchRequest) -> RequestResult:
        if semaphore is None:
            return await send(request)
        async with semaphore:
            return await send(request)

    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(config.max_duration_s):
            for request, offset in zip(requests, offsets):
                delay = t0 + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(send_when_allowed(request), name=request.request_id))
            await asyncio.gather(*tasks, return_exceptions=True)
    except TimeoutError:
        in_flight = sum(1 for t in tasks if not t.done() and t.get_name() in start_times)
        logger.warning("time limit of %.1f s reached: cancelling %d in-flight requests (%d not sent yet)",
                       config.max_duration_s, in_flight, len(requests) - len(start_times))
    finally:
        duration_s = time.perf_counter() - t0
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        progress.set_postfix(output_chunks=num_output_chunks)
        progress.close()

    results = []
    for request, task in zip(requests, tasks):
        if request.request_id not in start_times:
            continue  # waited for a concurrency slot until the limit: never sent
        if task.cancelled():
            results.append(RequestResult(request.request_id, error_kind=CANCELLED,
                                         error=f"cut off by max_duration_s={config.max_duration_s}",
                                         prompt_len=request.prompt_len,
                                         start_time=start_times[request.request_id], end_time=t0 + duration_s))
        elif (exc := task.exception()) is not None:
            results.append(RequestResult(request.request_id, error_kind=type(exc).__name__, error=str(exc),
                                         prompt_len=request.prompt_len,
                                         start_time=start_times[request.request_id], end_time=t0 + duration_s))
        else:
            results.append(task.result())
    return t0, results, duration_s


def _fill_token_counts(result: RequestResult, config: BenchConfig, codec: TokenCodec, exact: bool) -> None:
    """Output tokens as the server reported them in its usage (exact), else by the model's tokenizer
    when given (re-tokenising text over-counts: an output cut mid-character comes back as U+FFFD,
    three bytes that re-tokenise to several tokens), else as the backend counted them; prompt tokens
    of text prompts from the server's usage when no tokenizer was given."""
    if not exact and result.usage_completion_tokens is None and codec.has_tokenizer and result.output_text:
        result.output_len = codec.count(result.output_text) or result.output_len
    if config.prompt_format == "text" and not codec.has_tokenizer and result.usage_prompt_tokens:
        result.prompt_len = result.usage_prompt_tokens


def _fill_ideal_hits(hits: PrefixHits, config: BenchConfig, requests: list[BenchRequest],
                     results: list[RequestResult]) -> None:
    """The trace's ideal hit ratios for the requests sent (in send order), counted over those the
    measured ratio counts (successful, usage reported; all successful ones if none reported)."""
    sent = {r.request_id for r in results}
    counted = {r.request_id for r in results if r.success and (r.usage_cached_tokens is not None
                                                                 or not hits.num_reporting)}
    replayed = [r for r in requests if r.request_id in sent]
    hits.ideal_unbounded = ideal_hit_ratio(replayed, counted, config.scaled_block_size)
    if config.ideal_lru_blocks is not None:
        hits.ideal_lru_blocks = config.ideal_lru_blocks
        hits.ideal_lru = ideal_hit_ratio(replayed, counted, config.scaled_block_size, config.ideal_lru_blocks)
    measured = {r.request_id: (r.usage_cached_tokens or 0, r.start_time, r.chunk_times[0] if r.chunk_times else None)
                for r in results if r.request_id in counted}
    misses = ideal_misses(replayed, measured, config.scaled_block_size)
    hits.ideal_missed_in_flight_tokens = misses.in_flight_tokens
    hits.ideal_missed_computed_tokens = misses.computed_tokens


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _timeline_bin_s(duration_s: float) -> float:
    """1 s bins, or a tenth of a run shorter than 10 s (so short runs still show a shape)."""
    return 1.0 if duration_s >= 10 else max(duration_s / 10, 0.01)


def _write_outputs(result: BenchResult) -> None:
    from . import report

    if result.config.result_json:
        report.write_json(result, result.config.result_json)
    if result.config.plot_dir:
        report.plot_run(result, result.config.plot_dir)
