"""Helpers for integration tests: start clusters, poll conditions with deadlines."""

from __future__ import annotations

import asyncio
import time


from pdserve.cluster import Cluster, ClusterSpec
from pdserve.cluster import start_cluster as _start_cluster


def start_cluster(spec: ClusterSpec, timeout_s: float = 180.0) -> Cluster:
    return _start_cluster(spec, timeout_s=timeout_s)


def hf_greedy_logprobs(model_dir, prompts: list[list[int]], num_new: int) -> list[tuple[list[int], list[float]]]:
    """transformers' greedy tokens and their logprobs for each prompt (the parity reference)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    refs = []
    for p in prompts:
        out = hf.generate(torch.tensor([p]), max_new_tokens=num_new, min_new_tokens=num_new, do_sample=False,
                          eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        tokens = out.sequences[0, len(p):].tolist()
        refs.append((tokens, [torch.log_softmax(lg[0], -1)[t].item() for lg, t in zip(out.logits, tokens)]))
    return refs


async def complete_all(address: str, prompts: list[list[int]], num_new: int) -> list:
    """Greedy completions (with logprobs) of all prompts at once through the router at `address`."""
    from pdserve.client import Client

    async with Client(address) as client:
        return await asyncio.gather(*(
            client.complete(p, max_tokens=num_new, temperature=0.0, ignore_eos=True, logprobs=True, timeout_s=120)
            for p in prompts))


def replace_prefill_worker(cluster: Cluster) -> str:
    """Kill the prefill worker and start a fresh one (empty local prefix cache); returns its address."""
    import signal

    from pdserve.client import Client

    old = next(p for p in cluster.procs if p.name.startswith("prefill") and p.alive())
    cluster.kill(old.name, signal.SIGKILL)
    new = cluster.start_worker("prefill", len([p for p in cluster.procs if p.name.startswith("prefill")]))

    async def ready():
        async with Client(cluster.router_address) as client:
            return [w for w in await client.workers() if w.role == 1 and w.healthy and w.address != old.address]
    asyncio.run(wait_until(ready, timeout_s=60, what="replacement prefill worker healthy"))
    return new.address


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Samples of a /metrics page: (sample name, sorted labels) -> value."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, v2) in ls for k, v2 in labels.items()))


async def wait_until(predicate, timeout_s: float = 20.0, interval_s: float = 0.1, what: str = "condition"):
    """Poll an async predicate until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s} s (last: {value!r})")
        await asyncio.sleep(interval_s)


async def all_blocks_free(client) -> bool:
    """True when every worker the router knows holds no KV block, reservation or request."""
    workers = await client.workers()
    await asyncio.sleep(0)  # stats are polled by the router; callers poll this with a deadline
    return bool(workers) and all(
        w.stats.num_free_kv_blocks == w.stats.num_kv_blocks and w.stats.num_reservations == 0
        and w.stats.num_requests_active == 0 and w.stats.num_running == 0 and w.stats.num_waiting == 0
        for w in workers)


