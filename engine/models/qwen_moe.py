"""Qwen2-MoE and Qwen3-MoE: Qwen attention (q/k/v bias on Qwen2, per-head q/k RMSNorm on Qwen3) with
a sparse MoE MLP (softmax top-k, renormalised when `norm_topk_prob`), dense MLPs on `mlp_only_layers`
and off the `decoder_sparse_step`; Qwen2-MoE adds a sigmoid-gated shared expert."""

from __future__ import annotations

from pdserve.engine.attention import make_attention
from pdserve.engine.loader import Checkpoint
from pdserve.engine.model_config import ConfigReader, ModelConfig
from pdserve.engine.models.base import BuildOptions, Decoder, ModelFamily, build_decoder
from pdserve.engine.models.layers import DenseMLP, load_dense_mlp, load_gqa
from pdserve.engine.models.llama import check_no_sliding_window
from pdserve.engine.models.moe import MoEConfig, Router, SparseMoE, load_experts, moe_fields


def parse_config(r: ConfigReader, arch: str) -> MoEConfig:
    check_no_sliding_window(r, arch)
    qwen2 = arch == "Qwen2MoeForCausalLM"
    qkv_bias = bool(r.raw.get("qkv_bias", True)) if qwen2 else bool(r.raw.get("attention_bias", False))
    common = ModelConfig.common_fields(r, arch, qkv_bias=qkv_bias)
    only = r.raw.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
        raise r.fail("mlp_only_layers", f"must be a list of layer indices, got {only!r}")
    moe = moe_fields(r, common["num_layers"], experts_keys=("num_experts", "num_local_experts"),
                     every=r.get("decoder_sparse_step", 1), mlp_only_layers=tuple(only))
    return MoEConfig(**common, **moe, moe_intermediate_size=r.need("moe_intermediate_size"),
                     norm_topk_prob=r.get("norm_topk_prob", not qwen2, bool),
                     shared_expert_intermediate_size=r.get("shared_expert_intermediate_size", 0) if qwen2 else 0,
                     qk_norm=not qwen2)


def build(config: ModelConfig, ckpt: Checkpoint, opts: BuildOptions) -> Decoder:
    c = config
    assert isinstance(c, MoEConfig)
    attention = make_attention(opts.attention_backend, ckpt.device, c.num_heads, c.num_kv_heads, c.head_dim)

    def mlp(i: int, p: str) -> SparseMoE | DenseMLP:
        if not c.sparse_layers[i]:
            return load_dense_mlp(ckpt, p + "mlp.", c.hidden_size, c.intermediate_size, opts.linear)
        router = Router(ckpt.take_float32(p + "mlp.gate.weight", (c.num_experts, c.hidden_size)),
                        c.num_experts_per_tok, normalize=c.norm_topk_prob)
        experts = load_experts(ckpt, p + "mlp.experts.", c.num_experts, c.hidden_size, c.moe_intermediate_size,
                               opts.linear)
        shared = gate = None
        if c.shared_expert_intermediate_size:
            shared = load_dense_mlp(ckpt, p + "mlp.shared_expert.", c.hidden_size, c.shared_expert_intermediate_size,
                                    opts.linear)
            gate = ckpt.take(p + "mlp.shared_expert_gate.weight", (1, c.hidden_size))
        return SparseMoE(router, experts, shared, gate)

    return build_decoder(c, ckpt, opts, attention.name, mlp=mlp,
                         attn=lambda i, p: load_gqa(c, ckpt, p, attention, opts.linear, qk_norm=c.qk_norm))


FAMILY = ModelFamily(
    name="qwen_moe",
    architectures=("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"),
    parse_config=parse_config,
    build=build,
    notes="no sliding window (`use_sliding_window`)",
)
