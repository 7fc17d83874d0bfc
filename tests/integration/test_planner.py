"""The planner with real processes (a router with --planner slo, one prefill and one decode worker):
under a prefill-heavy load (bursts of long prompts, short outputs) the 1P:1D split meets the targets and
stays; a shift to decode-heavy (short prompts, long outputs, more streams than one decode worker holds
within the TPOT target) moves the split to all colocated, and every request of both phases finishes.
(An unreachable worker: tests/unit/planner/test_planner.py.)"""

from __future__ import annotations

import asyncio

import pytest

from integration_helpers import scrape, start_cluster, total
from pdserve.client import Client
from pdserve.cluster import ClusterSpec
from pdserve.planner.planner import split_of
from pdserve.proto import pdserve_pb2 as pb

PLANNER_ARGS = ["--planner", "slo", "--planner-interval-s", "0.5", "--planner-window-s", "8",
                "--planner-min-requests", "6", "--planner-hold-s", "3", "--planner-confirm", "2",
                "--planner-tpot-slo-ms", "20", "--planner-ttft-slo-ms", "3000", "--health-interval-s", "0.2"]


def split(workers: list[pb.WorkerInfo]) -> tuple[int, int, int]:
    """(prefill, decode, colocated) as the planner counts them (split_of: with no prefill worker left, a
    decode worker prefills everything itself and counts as colocated)."""
    s = split_of(w.role for w in workers if w.healthy)
    return s.num_prefill, s.num_decode, s.num_colocated


def prompt(seed: int, i: int, length: int) -> list[int]:
    return [(seed * 131 + i * 7 + j) % 400 + 1 for j in range(length)]


async def bursts(client: Client, n: int, prompt_len: int, max_tokens: int, burst: int, gap_s: float,
                 seed: int) -> list:
    """`n` requests in bursts of `burst`, `gap_s` apart; returns the completions (raises on any failure)."""
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(client.complete(prompt(seed, i, prompt_len), max_tokens=max_tokens,
                                                         temperature=0.0, ignore_eos=True, timeout_s=120)))
        if (i + 1) % burst == 0:
            await asyncio.sleep(gap_s)
    return await asyncio.gather(*tasks)


async def streams(client: Client, num_streams: int, until, prompt_len: int, max_tokens: int, seed: int) -> list:
    """`num_streams` closed-loop streams, each sending its next request when the last finished, until
    `until()` is true (at most 40 requests each); returns every completion."""
    async def stream(k: int) -> list:
        outs = []
        for i in range(40):
            outs.append(await client.complete(prompt(seed + k, i, prompt_len), max_tokens=max_tokens,
                                              temperature=0.0, ignore_eos=True, timeout_s=120))
            if await until():
                break
        return outs
    return [c for outs in await asyncio.gather(*(stream(k) for k in range(num_streams))) for c in outs]


@pytest.fixture
def cluster(tiny_model_dir):
    spec = ClusterSpec(model=str(tiny_model_dir), num_prefill=1, num_decode=1, router_args=PLANNER_ARGS,
                       worker_args=["--kv-cache-memory-mb", "64"])
    c = start_cluster(spec)
    try:
        yield c
    finally:
        c.stop()


async def test_workload_shift_moves_the_split_and_keeps_every_request(cluster):
    async with Client(cluster.router_address) as client:
        heavy = await bursts(client, 20, prompt_len=480, max_tokens=12, burst=2, gap_s=1.0, seed=1)
        assert all(len(c.token_ids) == 12 for c in heavy)
        assert split(await client.workers()) == (1, 1, 0)  # prefill-heavy: 1P:1D meets the targets, so it stays

        async def colocated():
            return split(await client.workers()) == (0, 0, 2)
        outs = await streams(client, 12, colocated, prompt_len=8, max_tokens=100, seed=2)
        assert await colocated(), "the planner did not make both workers colocated"
        assert all(len(c.token_ids) == 100 for c in outs)  # every request finished through the switches
        # colocated in what it does: long prompts (remote on 1P:1D) are now all prefilled where they decode
        remote = total(scrape(f"{cluster.http_url}/metrics"), "pdserve:router_prefills_total", where="remote")
        more = await bursts(client, 4, prompt_len=480, max_tokens=4, burst=4, gap_s=0.0, seed=3)
        assert all(len(c.token_ids) == 4 for c in more)
    samples = scrape(f"{cluster.http_url}/metrics")
    assert total(samples, "pdserve:router_prefills_total", where="remote") == remote
    assert total(samples, "pdserve:planner_decisions_total", action="switched") >= 1
    assert total(samples, "pdserve:planner_split_workers", role="colocated") == 2
    log = (cluster.log_dir / "router.log").read_text()
    assert "planner switch 1P:1D -> 2 colocated" in log and "slo mode; load:" in log
