"""Mixtral: Llama/Mistral attention with a sparse MoE MLP (softmax top-k over `num_local_experts`,
renormalised; experts `block_sparse_moe.experts.{e}.w1/w3/w2`)."""

from __future__ import annotations

from pdserve.engine.attention import make_attention
from pdserve.engine.loader import Checkpoint
from pdserve.engine.model_config import ConfigReader, ModelConfig
from pdserve.engine.models.base import BuildOptions, Decoder, ModelFamily, build_decoder
from pdserve.engine.models.layers import load_gqa
from pdserve.engine.models.llama import check_no_sliding_window
from pdserve.engine.models.moe import MoEConfig, Router, SparseMoE, load_experts, moe_fields


def parse_config(r: ConfigReader, arch: str) -> MoEConfig:
    check_no_sliding_window(r, arch)
    common = ModelConfig.common_fields(r, arch, qkv_bias=False)
    moe = moe_fields(r, common["num_layers"], experts_keys=("num_local_experts",))
    return MoEConfig(**common, **moe, moe_intermediate_size=common["intermediate_size"], norm_topk_prob=True)


def build(config: ModelConfig, ckpt: Checkpoint, opts: BuildOptions) -> Decoder:
    c = config
    assert isinstance(c, MoEConfig)
    attention = make_attention(opts.attention_backend, ckpt.device, c.num_heads, c.num_kv_heads, c.head_dim)

    def moe(i: int, p: str) -> SparseMoE:
        p += "block_sparse_moe."
        router = Router(ckpt.take_float32(p + "gate.weight", (c.num_experts, c.hidden_size)), c.num_experts_per_tok,
                        normalize=True)
        return SparseMoE(router, load_experts(ckpt, p + "experts.", c.num_experts, c.hidden_size, c.intermediate_size,
                                              opts.linear, names=("w1", "w3", "w2")))

    return build_decoder(c, ckpt, opts, attention.name, attn=lambda i, p: load_gqa(c, ckpt, p, attention, opts.linear),
                         mlp=moe)


FAMILY = ModelFamily(
    name="mixtral",
    architectures=("MixtralForCausalLM",),
    parse_config=parse_config,
    build=build,
    notes="no sliding window; router jitter is a training-only feature and is ignored",
)
