"""Greedy float32 parity: pdserve's engine == Hugging Face transformers, tokens and logits, for every
registered family (small random checkpoints saved by transformers' own classes, tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams

NUM_NEW = 20
PROMPT_LENS = (3, 17, 40, 100, 33, 64)


def _prompts(vocab: int, lens=PROMPT_LENS, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def hf_greedy(model_dir, prompts, num_new=NUM_NEW):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    results = []
    for p in prompts:
        out = hf.generate(torch.tensor([p]), max_new_tokens=num_new, min_new_tokens=num_new, do_sample=False,
                          eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        results.append((out.sequences[0, len(p):].tolist(), torch.stack([x[0] for x in out.logits])))
    return results


@pytest.fixture(scope="module")
def references(hf_model_dirs):
    return {kind: hf_greedy(d, _prompts(512)) for kind, d in hf_model_dirs.items()}


def run_engine(model_dir, prompts, **config):
    engine = LLMEngine(EngineConfig(model=str(model_dir), **config))
    engine.capture_logits = True
    out = engine.generate(prompts, SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True))
    return engine, out


def assert_matches(out, refs):
    for completion, (ref_tokens, ref_logits) in zip(out, refs):
        assert completion.token_ids == ref_tokens
        got = torch.stack(completion.logits)
        torch.testing.assert_close(got, ref_logits, rtol=1e-4, atol=1e-4)


def test_reference_outputs_vary(references):
    """Guard against a degenerate model: parity of a constant stream would prove little."""
    for refs in references.values():
        for tokens, _ in refs:
            assert len(set(tokens)) >= NUM_NEW // 3, tokens


@pytest.mark.parametrize("kind", ["llama", "llama3-rope", "qwen2"])
@pytest.mark.parametrize("config", [
    {},
    {"max_num_batched_tokens": 16},  # prompts span several chunks, mixed with decodes
    {"enable_chunked_prefill": False},
    {"max_num_seqs": 2},
    # the plain-torch reference kernels (F.linear + gather/SDPA), also what non-CPU devices run
    {"attention_backend": "reference", "linear_backend": "torch"},
    {"attention_backend": "reference", "linear_backend": "torch", "max_num_batched_tokens": 16},
    # the fast kernels named explicitly, so a silent fallback to the reference cannot pass for them
    {"attention_backend": "paged-cpu", "linear_backend": "onednn", "max_num_batched_tokens": 16},
], ids=["chunked", "small-chunks", "no-chunking", "small-batch", "reference", "reference-small-chunks",
        "kernels-small-chunks"])
def test_batch_parity(hf_model_dirs, references, kind, config):
    _, out = run_engine(hf_model_dirs[kind], _prompts(512), **config)
    assert_matches(out, references[kind])


# the families added through the registry, on the paths that differ for them: chunked prefill mixed
# with decodes, the reference kernels, and the fast kernels named explicitly
NEW_FAMILIES = ["mistral", "qwen3", "mixtral", "qwen2-moe", "qwen3-moe", "deepseek-v2", "deepseek-v3"]


@pytest.mark.parametrize("kind", NEW_FAMILIES)
@pytest.mark.parametrize("config", [
    {},
    {"max_num_batched_tokens": 16},
    {"attention_backend": "reference", "linear_backend": "torch", "max_num_batched_tokens": 16},
    {"attention_backend": "paged-cpu", "linear_backend": "onednn", "max_num_batched_tokens": 16},
], ids=["chunked", "small-chunks", "reference-small-chunks", "kernels-small-chunks"])
def test_family_parity(hf_model_dirs, references, kind, config):
    _, out = run_engine(hf_model_dirs[kind], _prompts(512), **config)
    assert_matches(out, references[kind])


@pytest.mark.parametrize("kind", ["llama", "qwen2", *NEW_FAMILIES])
def test_prefix_cache_hits_keep_parity(hf_model_dirs, references, kind):
    engine = LLMEngine(EngineConfig(model=str(hf_model_dirs[kind])))
    engine.capture_logits = True
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    prompts = _prompts(512)
    engine.generate(prompts, params)
    again = engine.generate(prompts, params)  # same prompts: every full block but the last is a hit
    assert sum(c.num_cached_tokens for c in again) > 0
    assert [c.num_cached_tokens for c in again] == [((len(p) - 1) // 16) * 16 for p in prompts]
    assert_matches(again, references[kind])


def test_shared_prefix_parity(hf_model_dirs):
    g = torch.Generator().manual_seed(7)
    system = torch.randint(3, 512, (48,), generator=g).tolist()
    prompts = [system + torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 20, 37)]
    refs = hf_greedy(hf_model_dirs["qwen2"], prompts)
    engine = LLMEngine(EngineConfig(model=str(hf_model_dirs["qwen2"])))
    engine.capture_logits = True
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    first = engine.generate(prompts[:1], params)
    rest = engine.generate(prompts[1:], params)
    assert [c.num_cached_tokens for c in rest] == [48, 48]
    assert_matches(first + rest, refs)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3-moe", "deepseek-v3"])
def test_preemption_keeps_parity(hf_model_dirs, references, kind):
    # 14 blocks of 16 tokens cannot hold all six sequences at once: some are preempted and recomputed.
    engine, out = run_engine(hf_model_dirs[kind], _prompts(512), num_kv_blocks=14)
    assert engine.stats()["num_preemptions"] > 0
    assert_matches(out, references[kind])
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("kind", ["deepseek-v2", "deepseek-v3"])
def test_mla_caches_the_latent_not_k_and_v(hf_model_dirs, kind):
    """The paged cache holds kv_lora_rank + qk_rope_head_dim per token and layer (one plane), and
    recomputing a prompt's latent from the cached prefix gives the same logits (prefix hits above)."""
    engine = LLMEngine(EngineConfig(model=str(hf_model_dirs[kind]), num_kv_blocks=16))
    c = engine.model_config
    layout = engine.kv_cache.layout()
    assert (layout.num_planes, layout.num_kv_heads, layout.head_dim) == (1, 1, c.kv_lora_rank + c.qk_rope_head_dim)
    mha_token_nbytes = c.num_layers * 2 * c.num_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim) * 4
    assert layout.token_nbytes == c.kv_bytes_per_token < mha_token_nbytes / 4
