"""The model registry: architectures pick their family; bad checkpoints fail at load naming what to fix."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.model_config import ModelConfig
from pdserve.engine.models import ARCHITECTURES, FAMILIES, supported_architectures
from pdserve.errors import InvalidModel


def test_every_architecture_has_one_family():
    names = [a for f in FAMILIES for a in f.architectures]
    assert len(names) == len(set(names)) == len(ARCHITECTURES)
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"} <= set(names)


def test_unknown_architecture_lists_the_supported_ones(tiny_model_dir):
    raw = json.loads((tiny_model_dir / "config.json").read_text())
    raw["architectures"] = ["GPT2LMHeadModel"]
    with pytest.raises(InvalidModel, match="architectures") as info:
        ModelConfig.from_dict(raw)
    assert all(arch in str(info.value) for arch in supported_architectures())


def test_mistral_with_a_sliding_window_fails_naming_the_field(tiny_model_dir):
    raw = json.loads((tiny_model_dir / "config.json").read_text())
    raw.update(architectures=["MistralForCausalLM"], sliding_window=4096)
    with pytest.raises(InvalidModel, match="sliding_window"):
        ModelConfig.from_dict(raw)
    raw["sliding_window"] = None
    assert ModelConfig.from_dict(raw).architecture == "MistralForCausalLM"


def _copy_model(src, dst, edit):
    shutil.copytree(src, dst)
    path = next(dst.glob("*.safetensors"))
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    (dst / ".pdserve-fingerprint.json").unlink(missing_ok=True)
    return dst


def test_tensor_that_does_not_match_the_config_fails_with_its_name_and_both_shapes(tiny_model_dir, tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight"

    def shrink(tensors):
        tensors[name] = tensors[name][:-1].contiguous()

    bad = _copy_model(tiny_model_dir, tmp_path / "bad", shrink)
    expected = tuple(load_file(str(next(tiny_model_dir.glob("*.safetensors"))))[name].shape)
    with pytest.raises(InvalidModel) as info:
        LLMEngine(EngineConfig(model=str(bad), num_kv_blocks=8))
    message = str(info.value)
    assert name in message and str(expected) in message and str((expected[0] - 1, expected[1])) in message


def test_missing_tensor_fails_with_its_name(tiny_model_dir, tmp_path):
    name = "model.layers.2.mlp.down_proj.weight"
    bad = _copy_model(tiny_model_dir, tmp_path / "bad", lambda tensors: tensors.pop(name))
    with pytest.raises(InvalidModel, match=f"'{name}' is missing"):
        LLMEngine(EngineConfig(model=str(bad), num_kv_blocks=8))


def test_dense_kv_spec_is_k_and_v_per_kv_head(tiny_model_dir):
    c = ModelConfig.from_dir(tiny_model_dir)
    spec = c.kv_spec
    assert (spec.num_planes, spec.num_kv_heads, spec.head_dim) == (2, c.num_kv_heads, c.head_dim)
    assert c.kv_bytes_per_token == c.num_layers * 2 * c.num_kv_heads * c.head_dim * torch.float32.itemsize


def test_missing_expert_fails_naming_it(hf_model_dirs, tmp_path):
    name = "model.layers.2.block_sparse_moe.experts.3.w2.weight"
    bad = _copy_model(hf_model_dirs["mixtral"], tmp_path / "bad", lambda tensors: tensors.pop(name))
    with pytest.raises(InvalidModel, match=f"'{name}' is missing"):
        LLMEngine(EngineConfig(model=str(bad), num_kv_blocks=8))


def test_latent_rank_that_does_not_match_the_tensors_names_the_tensor_and_both_shapes(hf_model_dirs, tmp_path):
    src = hf_model_dirs["deepseek-v3"]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    raw = json.loads((bad / "config.json").read_text())
    raw["kv_lora_rank"] += 8
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(InvalidModel, match=r"kv_a_proj_with_mqa.weight' has shape \(48, 128\), config implies \(56, 128\)"):
        LLMEngine(EngineConfig(model=str(bad), num_kv_blocks=8))


def test_quantized_checkpoints_fail_naming_the_field(hf_model_dirs):
    raw = json.loads((hf_model_dirs["deepseek-v3"] / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "fp8"}
    with pytest.raises(InvalidModel, match="quantization_config"):
        ModelConfig.from_dict(raw)
