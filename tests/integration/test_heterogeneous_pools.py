"""Heterogeneous pools through `pdserve up --prefill-args/--decode-args` (real processes): the prefill worker
runs with a prefill chunk of 16 tokens (`--max-num-batched-tokens 16`: each prompt takes many steps, each with
its fixed cost), the decode worker with the default 512. The router learns each worker's prefill seconds per
token from the step times the workers report (router/worker_speed.py): the chunked prefill worker must come
out slower than the decode worker's local prefills, although short local prompts pay more fixed cost per
token. Ordering only, no timing threshold."""

from __future__ import annotations

import asyncio

import pytest

from integration_helpers import scrape, total, wait_until
from pdserve.client import Client
from pdserve.cluster import free_port
from pdserve.up_process import UpProcess

ROUTER_ARGS = "--health-interval-s 0.2 --local-prefill-threshold 128 --local-prefill-max-inflight 4"


@pytest.fixture
def up(tiny_model_dir, tmp_path):
    http_port = free_port()
    proc = UpProcess(["--model", str(tiny_model_dir), "--prefill", "1", "--decode", "1", "--store-nodes", "0",
                      "--http-port", str(http_port), "--router-args", ROUTER_ARGS,
                      "--worker-args", "--kv-cache-memory-mb 64",
                      "--prefill-args", "--max-num-batched-tokens 16"], log_dir=str(tmp_path / "up"))
    proc.start()
    try:
        asyncio.run(proc.wait_ready(2))
        proc.http_url = f"http://127.0.0.1:{http_port}"
        yield proc
    finally:
        assert proc.stop() == 0, proc.log_tail()


def learnt(url: str, name: str) -> dict[str, float]:
    """role -> the router's learnt value of `name` for that role's worker."""
    return {dict(labels)["role"]: v for (n, labels), v in scrape(f"{url}/metrics").items() if n == name}


def test_router_learns_each_workers_prefill_speed_from_its_step_times(up):
    async def main() -> None:
        async with Client(up.address) as client:
            for i in range(8):  # one at a time: the local prefills carry no decodes along
                long = [(i * 37 + j) % 400 + 5 for j in range(320)]  # >= the threshold: remote prefill
                short = [(i * 53 + j) % 400 + 7 for j in range(96)]  # short, decode idle: prefilled on decode
                a = await client.complete(long, max_tokens=2, temperature=0.0, ignore_eos=True, timeout_s=120)
                b = await client.complete(short, max_tokens=2, temperature=0.0, ignore_eos=True, timeout_s=120)
                assert len(a.token_ids) == len(b.token_ids) == 2
        samples = scrape(f"{up.http_url}/metrics")
        assert total(samples, "pdserve:router_prefills_total", where="remote") == 8
        assert total(samples, "pdserve:router_prefills_total", where="local") == 8

        async def both_learnt():
            got = learnt(up.http_url, "pdserve:router_worker_prefill_seconds_per_token")
            return got if {"prefill", "decode"} <= got.keys() else None
        speeds = await wait_until(both_learnt, timeout_s=10, what="learnt prefill speeds of both workers")
        assert speeds["prefill"] > speeds["decode"] > 0, speeds  # chunk 16 is slower per token than chunk 512
        decode_steps = learnt(up.http_url, "pdserve:router_worker_decode_step_seconds")
        assert decode_steps.keys() == {"decode"} and decode_steps["decode"] > 0  # only the decode worker decodes
    asyncio.run(main())
