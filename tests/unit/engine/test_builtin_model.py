"""The built-in checkpoint: byte-identical rebuilds, loadable by transformers, greedy output that varies."""

from __future__ import annotations

import hashlib
import os
import json
import sysconfig
from pathlib import Path

import pytest

from pdserve import cli
from pdserve.engine import builtin_model
from pdserve.engine.builtin_model import count_params, ensure_builtin_model, make_model
from pdserve.engine.tokenizer import Tokenizer

FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _digests(model_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model_dir.iterdir())}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("builtin") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="module")
def hf_model(tiny_dir):
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def test_writes_hf_llama_files(tiny_dir):
    assert sorted(p.name for p in tiny_dir.iterdir()) == sorted(FILES)
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"]) == (4, 256, 4, 2, 688, 2048)


def test_rebuild_is_byte_identical(tiny_dir, tmp_path, capsys):
    """The second build goes through the CLI, so it is tested too."""
    again = tmp_path / "again"
    assert cli.main(["make-model", "--size", "tiny", "--seed", "0", str(again)]) == 0
    assert f"wrote {again}" in capsys.readouterr().out
    assert _digests(again) == _digests(tiny_dir)


def test_seed_changes_weights():
    import torch

    size = builtin_model.SIZES["tiny"]
    seed0, seed1 = builtin_model.init_weights(size, seed=0), builtin_model.init_weights(size, seed=1)
    assert not torch.equal(seed0["lm_head.weight"], seed1["lm_head.weight"])
    again = builtin_model.init_weights(size, seed=0)
    assert all(torch.equal(t, again[n]) for n, t in seed0.items())


def test_tensor_names_and_param_count(tiny_dir):
    from safetensors import safe_open

    with safe_open(tiny_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
        num_params = sum(_numel(f.get_slice(n).get_shape()) for n in names)
    per_layer = {"input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    expected |= {f"model.layers.{i}.{n}.weight" for i in range(4) for n in per_layer}
    assert names == expected
    assert num_params == count_params("tiny")
    assert 3_000_000 < count_params("tiny") < 5_000_000
    assert 100_000_000 < count_params("small") < 140_000_000


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_config_loads_in_transformers_and_pdserve(tiny_dir, hf_model):
    from pdserve.engine.model_config import ModelConfig

    assert hf_model.config.num_key_value_heads == 2 and hf_model.config.tie_word_embeddings is False
    assert sum(p.numel() for p in hf_model.parameters()) == count_params("tiny")
    config = ModelConfig.from_dir(tiny_dir)
    assert config.rope_theta == 10000.0 and config.head_dim == 64


def _greedy(hf_model, prompt_ids: list[int], num_tokens: int = 64) -> tuple[list[int], "torch.Tensor"]:
    import torch

    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=num_tokens, min_new_tokens=num_tokens,
                                do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    top2 = torch.stack(out.scores)[:, 0].topk(2, dim=-1).values  # [num_tokens, 2]
    return out.sequences[0, len(prompt_ids):].tolist(), top2[:, 0] - top2[:, 1]


def _shortest_period(ids: list[int], max_period: int = 4) -> int | None:
    tail = ids[-16:]
    for p in range(1, max_period + 1):
        if all(tail[i] == tail[i + p] for i in range(len(tail) - p)):
            return p
    return None


def test_greedy_output_varies(tiny_dir, hf_model):
    import torch

    tok = Tokenizer(tiny_dir)
    code = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text()
    prompts = [(tok.encode(t), 64) for t in ("Hello, my name is", "日本語 😀")]
    prompts.append((tok.encode(code)[:1000], 32))  # a long prompt: attention must not wash the context out
    gaps = []
    for ids, num_tokens in prompts:
        generated, gap = _greedy(hf_model, ids, num_tokens)
        assert len(set(generated)) / len(generated) >= 0.4, tok.decode(generated)
        assert _shortest_period(generated) is None, generated
        gaps.append(gap)
    # top-1 vs top-2 logits far enough apart that float32 summation order cannot flip argmax
    assert torch.cat(gaps).median() > 0.3


def _fake_make_model(out_dir, size: str = "tiny", seed: int = 0) -> Path:
    """Stands in for the real build (seconds) in the cache tests; writes a versioned config only."""
    out_dir = Path(out_dir)
    (out_dir / "config.json").write_text(json.dumps({"pdserve_builtin_version": builtin_model.BUILTIN_FORMAT_VERSION,
                                                     "size": size, "seed": seed}))
    return out_dir


def test_ensure_builtin_model_caches(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin_model, "make_model", _fake_make_model)
    monkeypatch.setenv("PDSERVE_MODEL_CACHE", str(tmp_path / "cache"))
    path = ensure_builtin_model("tiny")
    assert path == tmp_path / "cache" / "tiny-seed0"
    assert json.loads((path / "config.json").read_text())["size"] == "tiny"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["tiny-seed0"]  # no temp dir left behind
    (path / "marker").touch()
    assert ensure_builtin_model("tiny") == path
    assert (path / "marker").exists()  # not rebuilt
    # a copy from an older format version is replaced; cache_dir overrides the environment
    (path / "config.json").write_text(json.dumps({"pdserve_builtin_version": 0}))
    assert ensure_builtin_model("tiny", cache_dir=tmp_path / "cache") == path
    assert not (path / "marker").exists()
    assert json.loads((path / "config.json").read_text())["pdserve_builtin_version"] == builtin_model.BUILTIN_FORMAT_VERSION
    assert ensure_builtin_model("small", cache_dir=tmp_path / "other") == tmp_path / "other" / "small-seed0"


def test_unknown_size_rejected(tmp_path):
    with pytest.raises(ValueError, match="huge"):
        make_model(tmp_path, size="huge")


@pytest.mark.slow
def test_small_model(tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    path = make_model(tmp_path / "small", size="small")
    hf_model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert sum(p.numel() for p in hf_model.parameters()) == count_params("small")
    generated, _ = _greedy(hf_model, Tokenizer(path).encode("Hello, my name is"), num_tokens=32)
    assert len(set(generated)) / len(generated) >= 0.4


def test_fingerprint_is_cached_and_follows_the_weights(tmp_path):
    from pdserve.engine.builtin_model import make_model
    from pdserve.engine.loader import FINGERPRINT_FILE, compute_model_fingerprint, model_fingerprint

    model = tmp_path / "m"
    make_model(model, size="tiny", seed=3)
    first = model_fingerprint(model)
    assert first == compute_model_fingerprint(model)
    assert (model / FINGERPRINT_FILE).is_file()
    assert model_fingerprint(model) == first  # served from the cache
    weights = next(model.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # other weights, same size: the mtime changes, so the cache no longer applies
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert model_fingerprint(model) == compute_model_fingerprint(model) != first
