"""Shared fixtures: models made on the spot (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")


# yarn rope as DeepSeek ships it (factor 40 over 4k), scaled down to these tiny models
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256,
         "beta_fast": 32, "beta_slow": 1}


def _hf_classes(kind: str):
    """(config class, model class, config kwargs beyond the shared small shape) of a parity kind."""
    import transformers as tf

    moe = dict(num_experts_per_tok=2, moe_intermediate_size=64)
    mla = dict(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=24, n_shared_experts=1,
               n_routed_experts=8, first_k_dense_replace=1, num_key_value_heads=4, **moe)
    table = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(num_key_value_heads=2, tie_word_embeddings=False)),
        "llama3-rope": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(
            num_key_value_heads=2, tie_word_embeddings=False,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 128})),
        # q/k/v bias, tied embeddings, GQA ratio 4
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(num_key_value_heads=1, tie_word_embeddings=True)),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(num_key_value_heads=2, sliding_window=None)),
        # per-head q/k RMSNorm; head_dim set apart from hidden / heads, as Qwen3 does
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(num_key_value_heads=2, head_dim=48,
                                                            tie_word_embeddings=False)),
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(num_key_value_heads=2, num_local_experts=4,
                                                                  num_experts_per_tok=2)),
        # shared expert with its sigmoid gate, un-normalised top-k, a dense layer between sparse ones
        "qwen2-moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM, dict(
            num_key_value_heads=2, num_experts=6, shared_expert_intermediate_size=96, norm_topk_prob=False,
            mlp_only_layers=[1], **moe)),
        "qwen3-moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, dict(
            num_key_value_heads=2, head_dim=32, num_experts=8, norm_topk_prob=True, decoder_sparse_step=2, **moe)),
        # MLA without q compression (V2-Lite's shape), group-limited greedy routing, yarn with an attention factor
        "deepseek-v2": (tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM, dict(
            q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
            rope_parameters={**_YARN, "mscale": 0.707, "mscale_all_dim": 0.707}, **mla)),
        # q compression, sigmoid scores with the selection bias, grouped top-k, yarn mscale in the softmax scale
        "deepseek-v3": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM, dict(
            q_lora_rank=48, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
            rope_parameters={**_YARN, "mscale": 1.0, "mscale_all_dim": 0.8}, **mla)),
    }
    if kind not in table:
        raise ValueError(kind)
    return table[kind]


HF_KINDS = ("llama", "llama3-rope", "qwen2", "mistral", "qwen3", "mixtral", "qwen2-moe", "qwen3-moe", "deepseek-v2",
            "deepseek-v3")


def make_hf_model(kind: str, out_dir: Path, seed: int = 0) -> Path:
    """A small random checkpoint of one registered family, saved by transformers itself.

    Weights are drawn wide enough (std 0.15) that greedy outputs vary instead of repeating one
    token, so the parity tests can fail; biases (incl. DeepSeek-V3's expert-selection bias) too.
    """
    import torch

    config_cls, model_cls, extra = _hf_classes(kind)
    torch.manual_seed(seed)
    common = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
    model = model_cls(config_cls(**{**common, **extra}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15, generator=None)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def hf_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-models")
    return {kind: make_hf_model(kind, root / kind) for kind in HF_KINDS}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The built-in tiny model, made once per test session (deterministic, no download)."""
    from pdserve.engine.builtin_model import ensure_builtin_model

    return ensure_builtin_model("tiny", cache_dir=tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="session")
def etcd_binary() -> str:
    """Debian's etcd-server (`.ci/run` installs it); tests that need it skip with the reason without it."""
    import shutil

    binary = shutil.which("etcd")
    if binary is None:
        pytest.skip("etcd is not installed (Debian package etcd-server; .ci/run installs it)")
    return binary
