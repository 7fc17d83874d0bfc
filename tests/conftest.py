"""Shared fixtures: models made on the spot (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")


def make_hf_model(kind: str, out_dir: Path, seed: int = 0) -> Path:
    """A small random Llama or Qwen2 checkpoint saved by transformers itself.

    Weights are drawn wide enough (std 0.15) that greedy outputs vary instead of repeating one
    token, so the parity tests can fail.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common))
    elif kind == "llama3-rope":
        model = LlamaForCausalLM(LlamaConfig(
            num_key_value_heads=2, tie_word_embeddings=False,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 128}, **common))
    elif kind == "qwen2":  # q/k/v bias, tied embeddings, GQA ratio 4
        model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=1, tie_word_embeddings=True, **common))
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15, generator=None)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def hf_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-models")
    return {kind: make_hf_model(kind, root / kind) for kind in ("llama", "llama3-rope", "qwen2")}


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
