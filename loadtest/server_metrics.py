"""Counters a run reads from the server's Prometheus /metrics before and after it (HTTP backends):
speculative decoding's proposed and accepted tokens, pdserve's names or vLLM's. A server without
/metrics, or without these counters, gives None and the report leaves the section out."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

# our name -> (pdserve's family, vLLM's family); summed over every sample (pdserve: one per worker)
SPEC_COUNTERS = {
    "drafts": ("pdserve:spec_decode_num_drafts", "vllm:spec_decode_num_drafts"),
    "draft_tokens": ("pdserve:spec_decode_num_draft_tokens", "vllm:spec_decode_num_draft_tokens"),
    "accepted_tokens": ("pdserve:spec_decode_num_accepted_tokens", "vllm:spec_decode_num_accepted_tokens"),
}
SCRAPE_TIMEOUT_S = 5.0
# a router reports its workers' counters as of its last poll: after a run, read until two reads agree
SETTLE_INTERVAL_S = 0.5
SETTLE_MAX_S = 5.0


@dataclass(slots=True)
class SpecDecode:
    """Speculative decoding during the run, from the server's counters (differences after - before)."""

    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int

    @property
    def acceptance_rate(self) -> float | None:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def mean_acceptance_length(self) -> float | None:
        """Tokens per speculative step: 1 + accepted per draft."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else None


def parse_spec_counters(text: str) -> dict[str, float] | None:
    """The summed counters in a Prometheus exposition, None when it has none of them."""
    key_of = {name: key for key, names in SPEC_COUNTERS.items() for name in names}
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:  # exposition formats differ on where "_total" sits; samples carry it
            if sample.name.endswith("_total") and (key := key_of.get(sample.name[:-len("_total")])):
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals if "draft_tokens" in totals and "accepted_tokens" in totals else None


async def scrape_spec_counters(base_url: str) -> dict[str, float] | None:
    if not base_url.startswith(("http://", "https://")):
        return None
    try:
        timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(f"{base_url.rstrip('/')}/metrics") as resp:
                if resp.status != 200:
                    return None
                text = await resp.text()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        logger.debug("no /metrics at %s: %s", base_url, exc)
        return None
    try:
        return parse_spec_counters(text)
    except ValueError:  # not a Prometheus exposition
        return None


async def scrape_settled_spec_counters(base_url: str) -> dict[str, float] | None:
    """`scrape_spec_counters` repeated until two reads SETTLE_INTERVAL_S apart agree (at most SETTLE_MAX_S)."""
    deadline = time.monotonic() + SETTLE_MAX_S
    last = await scrape_spec_counters(base_url)
    while last is not None and time.monotonic() < deadline:
        await asyncio.sleep(SETTLE_INTERVAL_S)
        now = await scrape_spec_counters(base_url)
        if now == last:
            break
        last = now
    return last


def spec_decode_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> SpecDecode | None:
    if before is None or after is None:
        return None
    d = {k: int(after.get(k, 0.0) - before.get(k, 0.0)) for k in SPEC_COUNTERS}
    if d["draft_tokens"] <= 0:
        return None
    return SpecDecode(d["drafts"], d["draft_tokens"], d["accepted_tokens"])
