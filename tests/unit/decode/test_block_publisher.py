"""Decode's generated-block publisher over a real engine: only blocks holding generated tokens, each once,
as soon as they are full (their KV final), with the bytes the pool held; a bounded queue that drops (and
counts) instead of waiting; puts batched one at a time.

The store is a stand-in recording what it was given (unit test); tests/integration/test_decode_resume.py
runs the real store and a real failover."""

from __future__ import annotations

import asyncio

import pytest
import torch

from pdserve.decode.block_publisher import GeneratedBlockPublisher
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kvstore.client import StagedBlocks

BS = 16


class FakeStore:
    """stage() copies the blocks' bytes, as the real client does; put_staged() records and completes on demand."""

    def __init__(self, llm: LLMEngine, staging_blocks: int = 1000) -> None:
        self.llm = llm
        self.free = staging_blocks
        self.staged: dict[bytes, torch.Tensor] = {}  # hash -> the block's KV when it was staged
        self.puts: list[tuple[bytes, ...]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    def stage(self, hashes, block_ids):
        n = min(len(hashes), self.free)
        if n == 0:
            return None
        self.free -= n
        for h, b in zip(hashes[:n], block_ids[:n]):
            assert h not in self.staged, "a block was staged twice"
            self.staged[h] = self.llm.kv_cache.read_blocks([b])[0].clone()
        return StagedBlocks(tuple(hashes[:n]), tuple(range(n)))

    def put_staged(self, staged: StagedBlocks):
        async def put():
            self.puts.append(staged.hashes)
            await self.gate.wait()
            self.free += len(staged.slots)
        return asyncio.get_running_loop().create_task(put())


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLMEngine(EngineConfig(model=str(tiny_model_dir), kv_cache_memory_mb=16, max_num_batched_tokens=64))


def _run(llm: LLMEngine, prompts: list[list[int]], max_tokens: int, publisher: GeneratedBlockPublisher):
    llm.full_block_hook = publisher.on_full_blocks
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        seqs = [llm.add_request(f"pub-{i}-{id(publisher)}", p, params) for i, p in enumerate(prompts)]
        while any(not s.is_finished for s in seqs):
            llm.step()
        return seqs
    finally:
        llm.full_block_hook = None


async def test_publishes_each_generated_block_once_with_its_final_kv(llm):
    store = FakeStore(llm)
    publisher = GeneratedBlockPublisher(store, BS, asyncio.get_running_loop(), max_pending_blocks=1000)
    prompts = [[7 + i for i in range(40)], [900 + i for i in range(16)]]  # partial and whole last prompt block
    seqs = _run(llm, prompts, 70, publisher)
    await publisher.wait_idle(5)
    for seq, prompt in zip(seqs, prompts):
        num_computed = seq.num_tokens - 1  # the last sampled token's KV is never computed
        want = seq.block_hashes[len(prompt) // BS:num_computed // BS]
        assert want and all(h in store.staged for h in want)
        for h in seq.block_hashes[:len(prompt) // BS]:
            assert h not in store.staged  # prompt-only blocks are prefill's to publish
    # the bytes staged are the KV of exactly those tokens: recompute them offline and compare
    ref = LLMEngine(EngineConfig(model=llm.config.model, kv_cache_memory_mb=16, max_num_batched_tokens=64))
    seq = seqs[0]
    tokens = seq.token_ids[:-1]
    ref.generate([tokens], SamplingParams(max_tokens=1, temperature=0.0))
    for i in range(len(prompts[0]) // BS, (len(tokens)) // BS):
        block = ref.block_manager.hash_to_block_id[seq.block_hashes[i]]
        torch.testing.assert_close(store.staged[seq.block_hashes[i]], ref.kv_cache.read_blocks([block])[0],
                                   rtol=1e-4, atol=1e-4)
    assert publisher.stats.num_dropped_blocks == 0
    assert sum(len(p) for p in store.puts) == publisher.stats.num_staged_blocks == len(store.staged)


async def test_a_full_queue_drops_and_counts_instead_of_waiting(llm):
    store = FakeStore(llm)
    store.gate.clear()  # puts never finish while the engine runs: the queue fills up
    publisher = GeneratedBlockPublisher(store, BS, asyncio.get_running_loop(), max_pending_blocks=3)
    seqs = _run(llm, [[300 + i for i in range(20)]], 120, publisher)
    generated_blocks = (seqs[0].num_tokens - 1) // BS - 20 // BS
    assert publisher.stats.num_staged_blocks == 3
    assert publisher.stats.num_dropped_blocks == generated_blocks - 3
    await asyncio.sleep(0)  # the loop picks up the staged blocks: one put, batched
    store.gate.set()
    await publisher.wait_idle(5)
    assert publisher.num_pending_blocks == 0 and store.free == 1000
    assert len(store.puts) <= 3 and sum(len(p) for p in store.puts) == 3


def test_queue_bound_is_checked():
    with pytest.raises(ValueError):
        GeneratedBlockPublisher(None, BS, None, max_pending_blocks=0)


async def test_a_request_is_unsettled_from_staging_until_its_put_ends(llm):
    store = FakeStore(llm)
    store.gate.clear()
    publisher = GeneratedBlockPublisher(store, BS, asyncio.get_running_loop(), max_pending_blocks=1000)
    seq = _run(llm, [[500 + i for i in range(16)]], 20, publisher)[0]  # fills the first generated block
    assert publisher.stats.num_staged_blocks == 1
    assert publisher.has_unsettled(seq.req_id)  # from staging on (engine thread), before the loop saw it
    assert not await publisher.wait_settled(seq.req_id, 0.05)  # the put is stuck: the bound gives up
    assert publisher.stats.num_hold_timeouts == 1
    waiter = asyncio.create_task(publisher.wait_settled(seq.req_id, 5))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    store.gate.set()
    assert await asyncio.wait_for(waiter, 5)
    assert not publisher.has_unsettled(seq.req_id) and await publisher.wait_settled(seq.req_id, 0)
    assert publisher.stats.num_holds == 2 and publisher.stats.num_settled_blocks == 1
    assert publisher.stats.settle_seconds >= 0.05
