"""Registered families through the real disaggregated path: router, prefill, decode, a KV store
master and node, KV over UCX. One family per distinct model module path (CI time: ~40 s each): Qwen3-MoE
(q/k norm + routed experts), Mixtral (its own expert names), DeepSeek-V2 and -V3 (MLA: a one-plane latent
layout on the wire and in the store). Mistral, Qwen3 and Qwen2-MoE run the same modules (engine parity
in tests/parity) and the Llama layout crosses processes in test_disaggregated.py. Greedy float32 tokens and logprobs == transformers == the in-process
engine, prompts spanning several prefill chunks, then prefix hits from the prefill worker's cache
and (after replacing the prefill worker) from the store. For DeepSeek (MLA) what crosses the wire
and sits in the store is the latent: the decode worker's received bytes per token equal the layout's.
"""

from __future__ import annotations

import asyncio
import shutil

import pytest
import torch

from integration_helpers import (complete_all, hf_greedy_logprobs, replace_prefill_worker, start_cluster,
                                 wait_until)
from pdserve import rpc
from pdserve.client import Client
from pdserve.cluster import ClusterSpec
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.proto import kvstore_pb2 as kpb
from pdserve.proto import kvstore_pb2_grpc as kpb_grpc

NUM_NEW = 12
PROMPT_LENS = (70, 130, 9)  # 70 and 130 span several 32-token chunks; 9 is below one block
FAMILIES = ["qwen3-moe", "mixtral", "deepseek-v2", "deepseek-v3"]


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in PROMPT_LENS]


async def _stats(address: str):
    async with Client(address) as client:
        return {w.address: w.stats for w in await client.workers(refresh=True)}


async def _num_stored_keys(address: str) -> int:
    async with rpc.channel(address) as ch:
        return (await kpb_grpc.KVStoreMasterStub(ch).Stats(kpb.MasterStatsRequest(), timeout=5)).num_keys


def _assert_matches(got, refs):
    for completion, (ref_tokens, ref_lps) in zip(got, refs):
        assert completion.token_ids == ref_tokens
        torch.testing.assert_close(torch.tensor(completion.logprobs), torch.tensor(ref_lps), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", FAMILIES)
def test_family_disaggregated_with_store_matches_transformers(kind, hf_model_dirs, tiny_model_dir, tmp_path):
    model_dir = tmp_path / kind  # the checkpoint plus a tokenizer (the router needs one; prompts are token ids)
    shutil.copytree(hf_model_dirs[kind], model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, model_dir / name)
    refs = hf_greedy_logprobs(model_dir, _prompts(), NUM_NEW)
    offline = LLMEngine(EngineConfig(model=str(model_dir))).generate(
        _prompts(), SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True, logprobs=True))
    _assert_matches(offline, refs)

    spec = ClusterSpec(model=str(model_dir), num_prefill=1, num_decode=1, num_store_nodes=1, http_port=-1,
                       worker_metrics=False,
                       router_args=["--local-prefill-threshold", "0", "--health-interval-s", "0.2"],
                       worker_args=["--max-num-batched-tokens", "32", "--kv-cache-memory-mb", "16"],
                       log_dir=str(tmp_path / "logs"))
    cluster = start_cluster(spec)
    try:
        first = asyncio.run(complete_all(cluster.router_address, _prompts(), NUM_NEW))
        _assert_matches(first, refs)
        assert all(c.prefill_worker.startswith("prefill@") and c.decode_worker.startswith("decode@") for c in first)
        prefill_stats = next(s for s in asyncio.run(_stats(cluster.router_address)).values() if s.role == 1)
        layout = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=1)).kv_cache.layout()
        # the prompts' KV went over the wire in (layer) blocks of the model's own layout (the latent for
        # MLA); a block a chunk only partly filled is pushed again with the next chunk
        blocks = sum(-(-n // 16) for n in PROMPT_LENS)
        sent = prefill_stats.kv_bytes_sent
        assert sent >= blocks * layout.block_nbytes and sent % layout.layer_block_nbytes == 0

        # the prefill worker's own prefix cache
        again = asyncio.run(complete_all(cluster.router_address, _prompts(), NUM_NEW))
        _assert_matches(again, refs)
        hits = [((n - 1) // 16) * 16 for n in PROMPT_LENS]
        assert [c.usage.cached_tokens for c in again] == hits

        full_blocks = sum(n // 16 for n in PROMPT_LENS)
        asyncio.run(wait_until(lambda: _stored_at_least(cluster.store_address, full_blocks), timeout_s=30,
                               what="prompt blocks published to the store"))
        replace_prefill_worker(cluster)  # empty local cache: hits now come from the store
        from_store = asyncio.run(complete_all(cluster.router_address, _prompts(), NUM_NEW))
        _assert_matches(from_store, refs)
        assert [c.usage.cached_tokens for c in from_store] == hits
    finally:
        cluster.stop()


async def _stored_at_least(address: str, n: int) -> bool:
    return await _num_stored_keys(address) >= n
