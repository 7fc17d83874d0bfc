"""Qwen3 dense: Llama's layout plus a per-head RMSNorm on q and k before RoPE (`q_norm`, `k_norm`)."""

from __future__ import annotations

from pdserve.engine.loader import Checkpoint
from pdserve.engine.model_config import ConfigReader, ModelConfig
from pdserve.engine.models.base import BuildOptions, Decoder, ModelFamily
from pdserve.engine.models.llama import build_dense, check_no_sliding_window


def parse_config(r: ConfigReader, arch: str) -> ModelConfig:
    check_no_sliding_window(r, arch)
    return ModelConfig(**ModelConfig.common_fields(r, arch, qkv_bias=bool(r.raw.get("attention_bias", False))))


def build(config: ModelConfig, ckpt: Checkpoint, opts: BuildOptions) -> Decoder:
    return build_dense(config, ckpt, opts, qk_norm=True)


FAMILY = ModelFamily(
    name="qwen3",
    architectures=("Qwen3ForCausalLM",),
    parse_config=parse_config,
    build=build,
    notes="no sliding window (`use_sliding_window`)",
)
