"""What every model family's config has in common, parsed from a Hugging Face `config.json`.

`ModelConfig.from_dir` reads the file and hands it to the family that `architectures` names
(`engine/models/`); a family subclasses `ModelConfig` for its own fields (experts, latent ranks).
Owns validation of what the runtime supports: an unsupported feature fails with an error naming
the config field. Does not own weights (each family module names and loads its own).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdserve.errors import InvalidModel


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """llama3-style frequency scaling (`rope_scaling.rope_type == "llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True, slots=True)
class KVSpec:
    """What the paged cache stores per token per layer: `num_planes` planes (2: K and V; 1: one latent
    vector that serves as both, MLA) of [num_kv_heads, head_dim] elements."""

    num_planes: int
    num_kv_heads: int
    head_dim: int

    @property
    def elements_per_token_layer(self) -> int:
        return self.num_planes * self.num_kv_heads * self.head_dim


class ConfigReader:
    """Typed access to a raw config dict; every error names the source and the field."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw, self.source = raw, source

    def need(self, key: str, kind: type = int) -> Any:
        if key not in self.raw or self.raw[key] is None:
            raise InvalidModel(f"{self.source}: missing field '{key}'")
        return self.check(key, self.raw[key], kind)

    def get(self, key: str, default: Any, kind: type = int) -> Any:
        value = self.raw.get(key)
        return default if value is None else self.check(key, value, kind)

    def check(self, key: str, value: Any, kind: type) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise InvalidModel(f"{self.source}: field '{key}' must be {kind.__name__}, got {value!r}")
        return value

    def fail(self, key: str, message: str) -> InvalidModel:
        return InvalidModel(f"{self.source}: field '{key}' {message}")

    def rope(self) -> dict[str, Any]:
        # transformers >= 5 writes `rope_parameters`; older versions `rope_theta` + `rope_scaling`.
        return dict(self.raw.get("rope_parameters") or self.raw.get("rope_scaling") or {})

    def rope_type(self) -> str:
        rope = self.rope()
        return rope.get("rope_type", rope.get("type", "default")) or "default"


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        """The config of a Hugging Face model directory, as its family (engine/models/) parses it."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise InvalidModel(f"{path}: config.json not found; --model must be a Hugging Face model directory")
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidModel(f"{path}: malformed JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise InvalidModel(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        from pdserve.engine.models import family_for  # the registry imports this module

        arch, family = family_for(raw, source)
        return family.parse_config(ConfigReader(raw, source), arch)

    @classmethod
    def common_fields(cls, r: ConfigReader, arch: str, *, qkv_bias: bool, llama3_rope: bool = True) -> dict[str, Any]:
        """The fields every family reads the same way (keyword arguments for the dataclass)."""
        act = r.raw.get("hidden_act", "silu")
        if act != "silu":
            raise r.fail("hidden_act", f"= {act!r} is not supported (only 'silu')")
        if r.raw.get("mlp_bias"):
            raise r.fail("mlp_bias", "= true is not supported")
        if r.raw.get("quantization_config"):
            raise r.fail("quantization_config", "is set: quantized checkpoints are not supported (use bf16/fp32 weights)")
        hidden = r.need("hidden_size")
        num_heads = r.need("num_attention_heads")
        num_kv_heads = r.get("num_key_value_heads", num_heads)
        head_dim = r.get("head_dim", hidden // num_heads)
        if num_heads % num_kv_heads:
            raise r.fail("num_attention_heads", "must be a multiple of 'num_key_value_heads'")
        rope = r.rope()
        rope_theta = float(r.raw.get("rope_theta", rope.get("rope_theta", 10000.0)))
        rope_type = r.rope_type()
        scaling = None
        if rope_type == "llama3" and llama3_rope:
            try:
                scaling = RopeScaling(
                    factor=float(rope["factor"]),
                    low_freq_factor=float(rope["low_freq_factor"]),
                    high_freq_factor=float(rope["high_freq_factor"]),
                    original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                )
            except KeyError as exc:
                raise r.fail("rope_scaling", f"(llama3) lacks {exc}") from exc
        elif rope_type != "default" and llama3_rope:
            raise r.fail("rope_scaling", f"type {rope_type!r} is not supported (default, llama3)")
        eos = r.raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return dict(
            architecture=arch,
            vocab_size=r.need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=r.need("intermediate_size"),
            num_layers=r.need("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(r.raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=int(r.raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(r.raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            rope_scaling=scaling,
            bos_token_id=r.raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @property
    def kv_spec(self) -> KVSpec:
        """Per-token, per-layer KV of this model in the paged cache (K and V per KV head by default)."""
        return KVSpec(2, self.num_kv_heads, self.head_dim)

    @property
    def kv_bytes_per_token(self) -> int:
        """float32 bytes of the cached KV of one token across all layers."""
        return self.num_layers * self.kv_spec.elements_per_token_layer * 4

    @property
    def rope_dim(self) -> int:
        """Dimensions of a head that the rotary embedding turns."""
        return self.head_dim

    def inv_freq(self):  # -> torch.Tensor [rope_dim // 2], float32
        import torch

        dim = self.rope_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        if self.rope_scaling is None:
            return inv
        s = self.rope_scaling
        low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        inv_llama = torch.where(wavelen > low_freq_wavelen, inv / s.factor, inv)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        smoothed = (1 - smooth) * inv_llama / s.factor + smooth * inv_llama
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, inv_llama)
