"""Model architecture description parsed from a Hugging Face `config.json` (Llama and Qwen2 families).

Owns validation of what the runtime supports; an unsupported feature fails with an error naming
the config field. Does not own weights (see `loader.py`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdserve.errors import InvalidModel

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "llama"}


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """llama3-style frequency scaling (`rope_scaling.rope_type == "llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


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
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise InvalidModel(f"{path}: config.json not found; --model must be a Hugging Face model directory")
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidModel(f"{path}: malformed JSON ({exc})") from exc
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        def need(key: str, kind: type = int) -> Any:
            if key not in raw:
                raise InvalidModel(f"{source}: missing field '{key}'")
            value = raw[key]
            if kind is float and isinstance(value, int):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
                raise InvalidModel(f"{source}: field '{key}' must be {kind.__name__}, got {value!r}")
            return value

        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise InvalidModel(
                f"{source}: field 'architectures' = {archs!r} is not supported; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise InvalidModel(f"{source}: field 'hidden_act' = {act!r} is not supported (only 'silu')")
        if raw.get("mlp_bias"):
            raise InvalidModel(f"{source}: field 'mlp_bias' = true is not supported")
        if raw.get("use_sliding_window") or (family == "llama" and raw.get("sliding_window")):
            raise InvalidModel(f"{source}: field 'sliding_window'/'use_sliding_window' is not supported")

        hidden = need("hidden_size")
        num_heads = need("num_attention_heads")
        num_kv_heads = raw.get("num_key_value_heads") or num_heads
        head_dim = raw.get("head_dim") or hidden // num_heads
        if num_heads % num_kv_heads:
            raise InvalidModel(f"{source}: 'num_attention_heads' must be a multiple of 'num_key_value_heads'")

        # transformers >= 5 writes `rope_parameters`; older versions `rope_theta` + `rope_scaling`.
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_theta = float(raw.get("rope_theta", rope.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            try:
                scaling = RopeScaling(
                    factor=float(rope["factor"]),
                    low_freq_factor=float(rope["low_freq_factor"]),
                    high_freq_factor=float(rope["high_freq_factor"]),
                    original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                )
            except KeyError as exc:
                raise InvalidModel(f"{source}: field 'rope_scaling' (llama3) lacks {exc}") from exc
        elif rope_type not in ("default", None):
            raise InvalidModel(f"{source}: field 'rope_scaling' type {rope_type!r} is not supported (default, llama3)")

        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        qkv_bias = True if family == "qwen2" else bool(raw.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            rope_scaling=scaling,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """float32 bytes of K and V for one token across all layers."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * 4

    def inv_freq(self):  # -> torch.Tensor [head_dim // 2], float32
        import torch

        inv = 1.0 / (self.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim))
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
