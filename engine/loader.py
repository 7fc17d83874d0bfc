"""Loads Hugging Face safetensors weights into pdserve's fused layout, and fingerprints the model.

The fingerprint (config + weight bytes) goes into every block hash, so KV from another model
can never be mistaken for ours. It is computed once per model version and cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load_file

from pdserve.engine.model_config import ModelConfig
from pdserve.errors import InvalidModel


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(nh + 2 * nkv) * hd, hidden]: q, k, v fused for one matmul
    qkv_bias: torch.Tensor | None
    o: torch.Tensor  # [hidden, nh * hd]
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]: gate, up fused
    down: torch.Tensor  # [hidden, intermediate]


@dataclass(slots=True)
class ModelWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor  # [vocab, hidden] (the embedding when tied)


def _safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise InvalidModel(f"{model_dir}: no *.safetensors weight files found")
    return files


FINGERPRINT_FILE = ".pdserve-fingerprint.json"


def _fingerprint_key(model_dir: Path) -> dict:
    """What the cached fingerprint is valid for: config.json's bytes and each weight file's size and mtime."""
    return {"config_sha256": hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest(),
            "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in _safetensors_files(model_dir)}}


def _fingerprint_cache_paths(model_dir: Path) -> list[Path]:
    """Beside the model, else (a read-only model directory) under ~/.cache/pdserve/fingerprints."""
    digest = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:24]
    return [model_dir / FINGERPRINT_FILE, Path.home() / ".cache" / "pdserve" / "fingerprints" / f"{digest}.json"]


def compute_model_fingerprint(model_dir: str | Path) -> bytes:
    """16 bytes identifying this exact model: config.json plus every weight byte (reads them all)."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    h.update((model_dir / "config.json").read_bytes())
    for path in _safetensors_files(model_dir):
        digest = xxhash.xxh3_128()
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        h.update(path.name.encode())
        h.update(digest.digest())
    return h.digest()[:16]


def model_fingerprint(model_dir: str | Path) -> bytes:
    """`compute_model_fingerprint`, hashed once per model version: the result is cached (beside the
    model, or under ~/.cache) keyed by config.json's bytes and each weight file's size and mtime, so
    later starts of any process skip reading every weight byte."""
    model_dir = Path(model_dir)
    key = _fingerprint_key(model_dir)
    paths = _fingerprint_cache_paths(model_dir)
    for path in paths:
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                return bytes.fromhex(cached["fingerprint"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    fingerprint = compute_model_fingerprint(model_dir)
    record = json.dumps({"key": key, "fingerprint": fingerprint.hex()})
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(record)
            os.replace(tmp, path)
            break
        except OSError:
            continue
    return fingerprint


def load_weights(model_dir: str | Path, config: ModelConfig, dtype: torch.dtype = torch.float32,
                 device: str = "cpu") -> ModelWeights:
    model_dir = Path(model_dir)
    tensors: dict[str, torch.Tensor] = {}
    for path in _safetensors_files(model_dir):
        try:
            tensors.update(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError, json.JSONDecodeError) as exc:
            raise InvalidModel(f"{path}: cannot read safetensors file ({exc})") from exc

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in tensors:
            raise InvalidModel(f"{model_dir}: weight '{name}' is missing")
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise InvalidModel(f"{model_dir}: weight '{name}' has shape {tuple(t.shape)}, config implies {shape}")
        return t.to(dtype=dtype, device=device)

    c = config
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    layers = []
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        qkv = torch.cat([
            take(p + "self_attn.q_proj.weight", (q_out, c.hidden_size)),
            take(p + "self_attn.k_proj.weight", (kv_out, c.hidden_size)),
            take(p + "self_attn.v_proj.weight", (kv_out, c.hidden_size)),
        ])
        bias = None
        if c.qkv_bias:
            bias = torch.cat([
                take(p + "self_attn.q_proj.bias", (q_out,)),
                take(p + "self_attn.k_proj.bias", (kv_out,)),
                take(p + "self_attn.v_proj.bias", (kv_out,)),
            ])
        layers.append(LayerWeights(
            input_norm=take(p + "input_layernorm.weight", (c.hidden_size,)),
            qkv=qkv.contiguous(),
            qkv_bias=bias,
            o=take(p + "self_attn.o_proj.weight", (c.hidden_size, q_out)),
            post_norm=take(p + "post_attention_layernorm.weight", (c.hidden_size,)),
            gate_up=torch.cat([
                take(p + "mlp.gate_proj.weight", (c.intermediate_size, c.hidden_size)),
                take(p + "mlp.up_proj.weight", (c.intermediate_size, c.hidden_size)),
            ]).contiguous(),
            down=take(p + "mlp.down_proj.weight", (c.hidden_size, c.intermediate_size)),
        ))
    embed = take("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))
    if c.tie_word_embeddings or "lm_head.weight" not in tensors:
        if not c.tie_word_embeddings:
            raise InvalidModel(f"{model_dir}: weight 'lm_head.weight' is missing and tie_word_embeddings is false")
        lm_head = embed
    else:
        lm_head = take("lm_head.weight", (c.vocab_size, c.hidden_size))
    return ModelWeights(embed=embed, layers=layers, norm=take("model.norm.weight", (c.hidden_size,)), lm_head=lm_head)
