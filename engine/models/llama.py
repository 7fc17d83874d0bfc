"""Llama, Mistral and Qwen2: grouped-query attention with RoPE (llama3 scaling), dense SiLU MLP.

Qwen2 adds q/k/v biases and ties embeddings in its small sizes; Mistral is Llama's layout (its
sliding window is not supported: a config that sets one fails at load).
"""

from __future__ import annotations

from pdserve.engine.attention import make_attention
from pdserve.engine.loader import Checkpoint
from pdserve.engine.model_config import ConfigReader, ModelConfig
from pdserve.engine.models.base import BuildOptions, Decoder, ModelFamily, build_decoder
from pdserve.engine.models.layers import load_dense_mlp, load_gqa


def check_no_sliding_window(r: ConfigReader, arch: str) -> None:
    """Sliding-window attention is not implemented: Llama/Mistral's `sliding_window`; Qwen's
    `use_sliding_window` (Qwen configs carry a `sliding_window` size that is off unless that is set)."""
    uses_window = r.raw.get("use_sliding_window") or (not arch.startswith("Qwen") and r.raw.get("sliding_window"))
    if uses_window:
        raise r.fail("sliding_window", f"/'use_sliding_window' ({arch}) is not supported")


def parse_config(r: ConfigReader, arch: str) -> ModelConfig:
    check_no_sliding_window(r, arch)
    qkv_bias = True if arch == "Qwen2ForCausalLM" else bool(r.raw.get("attention_bias", False))
    return ModelConfig(**ModelConfig.common_fields(r, arch, qkv_bias=qkv_bias))


def build_dense(config: ModelConfig, ckpt: Checkpoint, opts: BuildOptions, qk_norm: bool = False) -> Decoder:
    """A dense GQA decoder (this family; Qwen3 with `qk_norm`)."""
    c = config
    attention = make_attention(opts.attention_backend, ckpt.device, c.num_heads, c.num_kv_heads, c.head_dim)
    return build_decoder(c, ckpt, opts, attention.name,
                         attn=lambda i, p: load_gqa(c, ckpt, p, attention, opts.linear, qk_norm=qk_norm),
                         mlp=lambda i, p: load_dense_mlp(ckpt, p + "mlp.", c.hidden_size, c.intermediate_size,
                                                         opts.linear))


FAMILY = ModelFamily(
    name="llama",
    architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
    parse_config=parse_config,
    build=build_dense,
    notes="RoPE default or llama3 scaling; no sliding window (Mistral's `sliding_window`, Qwen2's `use_sliding_window`)",
)
