"""DeepSeek-V2 / V3: multi-head latent attention (MLA) over a latent KV cache, and DeepSeekMoE.

MLA caches one vector per token and layer, `[c_kv (kv_lora_rank), k_rope (qk_rope_head_dim)]`,
instead of per-head K and V; that latent is what the paged cache, the prefill -> decode transfer
and the store hold. Attention absorbs the up-projections (as DeepSeek's and vLLM's inference code
do): each head's query is mapped into the latent space (q_nope @ W_UK), attention runs as MQA with
one KV head whose key is the latent and whose value is its first kv_lora_rank dimensions, and
W_UV maps the result back. It goes through the engine's attention backend (engine/attention.py)
unchanged: K and V are the same cache plane, so the value carries the rope dims too and they are
dropped after. The decoupled rotary part uses yarn scaling (DeepSeek's interleaved pair layout).
DeepSeekMoE: shared experts plus routed ones; V2 softmax scores (greedy or group-limited top-k),
V3 sigmoid scores with a selection-only bias and grouped top-k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pdserve.engine.attention import Attention, make_attention
from pdserve.engine.linear import Linear
from pdserve.engine.loader import Checkpoint
from pdserve.engine.model_config import ConfigReader, KVSpec, ModelConfig
from pdserve.engine.models.base import (BuildOptions, Decoder, ModelFamily, Rope, StepContext, apply_rope,
                                        build_decoder, rms_norm)
from pdserve.engine.models.layers import load_dense_mlp
from pdserve.engine.models.moe import MoEConfig, Router, SparseMoE, load_experts, moe_fields

LORA_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use RMSNorm's default, not rms_norm_eps


@dataclass(frozen=True, slots=True)
class YarnScaling:
    factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float
    mscale: float | None
    mscale_all_dim: float | None
    attention_factor: float | None
    truncate: bool


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DeepseekConfig(MoEConfig):
    q_lora_rank: int | None  # None: q is projected directly (V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool
    yarn: YarnScaling | None
    scoring: str  # "softmax" (V2) or "sigmoid" (V3, with e_score_correction_bias)
    num_groups: int  # expert groups for grouped top-k (1: plain top-k)
    topk_group: int
    routed_scaling_factor: float
    n_shared_experts: int

    @property
    def kv_spec(self) -> KVSpec:
        return KVSpec(1, 1, self.kv_lora_rank + self.qk_rope_head_dim)

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        if self.yarn is not None and self.yarn.mscale_all_dim:
            scale *= yarn_mscale(self.yarn.factor, self.yarn.mscale_all_dim) ** 2
        return scale

    @property
    def rope_attention_factor(self) -> float:
        """yarn's scale of cos/sin (1 without yarn)."""
        y = self.yarn
        if y is None:
            return 1.0
        if y.attention_factor is not None:
            return y.attention_factor
        if y.mscale and y.mscale_all_dim:
            return yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)
        return yarn_mscale(y.factor)

    def inv_freq(self):  # -> torch.Tensor [qk_rope_head_dim // 2]
        dim, base = self.qk_rope_head_dim, self.rope_theta
        pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
        y = self.yarn
        if y is None:
            return 1.0 / pos_freqs

        def correction_dim(num_rotations: float) -> float:
            return dim * math.log(y.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (
                2 * math.log(base))

        low, high = correction_dim(y.beta_fast), correction_dim(y.beta_slow)
        if y.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # no singularity
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp  # share of the original frequency kept per dimension
        return (1.0 / (y.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def _yarn(r: ConfigReader, max_positions: int) -> YarnScaling | None:
    rope, kind = r.rope(), r.rope_type()
    if kind == "default":
        return None
    if kind != "yarn":
        raise r.fail("rope_scaling", f"type {kind!r} is not supported for DeepSeek (default, yarn)")
    if "original_max_position_embeddings" not in rope:
        raise r.fail("rope_scaling", "(yarn) lacks 'original_max_position_embeddings'")
    original = int(rope["original_max_position_embeddings"])
    factor = rope.get("factor")
    return YarnScaling(
        factor=float(factor) if factor is not None else max_positions / original,
        original_max_position_embeddings=original,
        beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
        mscale=rope.get("mscale"), mscale_all_dim=rope.get("mscale_all_dim"),
        attention_factor=rope.get("attention_factor"), truncate=bool(rope.get("truncate", True)))


def parse_config(r: ConfigReader, arch: str) -> DeepseekConfig:
    v3 = arch == "DeepseekV3ForCausalLM"
    common = ModelConfig.common_fields(r, arch, qkv_bias=False, llama3_rope=False)
    if r.raw.get("attention_bias"):
        raise r.fail("attention_bias", "= true is not supported for DeepSeek")
    n = common["num_layers"]
    moe = moe_fields(r, n, experts_keys=("n_routed_experts", "num_local_experts"))
    first_dense, freq = r.get("first_k_dense_replace", 0), r.get("moe_layer_freq", 1)
    moe["sparse_layers"] = tuple(i >= first_dense and i % freq == 0 for i in range(n))
    num_groups, topk_group = r.get("n_group", 1), r.get("topk_group", 1)
    topk_method = r.get("topk_method", "noaux_tc" if v3 else "greedy", str)
    if not v3 and topk_method not in ("greedy", "group_limited_greedy"):
        raise r.fail("topk_method", f"= {topk_method!r} is not supported (greedy, group_limited_greedy)")
    if not v3 and topk_method == "greedy":
        num_groups = topk_group = 1
    if moe["num_experts"] % num_groups or not 0 < topk_group <= num_groups:
        raise r.fail("n_group", f"= {num_groups} must divide the experts and be >= topk_group ({topk_group})")
    scoring = r.get("scoring_func", "sigmoid" if v3 else "softmax", str)
    if scoring != ("sigmoid" if v3 else "softmax"):
        raise r.fail("scoring_func", f"= {scoring!r} is not supported for {arch}")
    return DeepseekConfig(
        **common, **moe,
        moe_intermediate_size=r.need("moe_intermediate_size"),
        norm_topk_prob=r.get("norm_topk_prob", False, bool),
        q_lora_rank=r.get("q_lora_rank", None),
        kv_lora_rank=r.need("kv_lora_rank"),
        qk_nope_head_dim=r.need("qk_nope_head_dim"),
        qk_rope_head_dim=r.need("qk_rope_head_dim"),
        v_head_dim=r.need("v_head_dim"),
        rope_interleave=r.get("rope_interleave", True, bool),
        yarn=_yarn(r, common["max_position_embeddings"]),
        scoring=scoring,
        num_groups=num_groups,
        topk_group=topk_group,
        routed_scaling_factor=float(r.get("routed_scaling_factor", 1.0, float)),
        n_shared_experts=r.get("n_shared_experts", 0),
    )


class MLAttention:
    """Absorbed MLA: writes the latent [c_kv, k_rope] to the cache and attends in latent space."""

    def __init__(self, c: DeepseekConfig, proj_a: Linear, q_a_norm: torch.Tensor | None, q_b: Linear | None,
                 kv_a_norm: torch.Tensor, kv_b: torch.Tensor, o: Linear, attention: Attention) -> None:
        self.c, self.attention = c, attention
        self.proj_a = proj_a  # hidden -> [q_lora_rank or nh * qk_head_dim, kv_lora_rank, qk_rope_head_dim]
        self.q_a_norm, self.q_b, self.kv_a_norm, self.o = q_a_norm, q_b, kv_a_norm, o
        nh, dn, dv, r = c.num_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank
        kv_b = kv_b.view(nh, dn + dv, r)
        self.w_uk = kv_b[:, :dn].contiguous()  # [nh, dn, r]: q_nope -> latent
        self.w_uv = kv_b[:, dn:].transpose(1, 2).contiguous()  # [nh, r, dv]: latent -> value
        q_out = c.q_lora_rank if c.q_lora_rank is not None else nh * (dn + c.qk_rope_head_dim)
        self.splits = [q_out, r, c.qk_rope_head_dim]
        # the backend scales scores by latent_dim ** -0.5; fold the model's own scale into q instead
        self.q_scale = c.softmax_scale * (r + c.qk_rope_head_dim) ** 0.5

    def _rope(self, x: torch.Tensor, step: StepContext) -> torch.Tensor:
        if self.c.rope_interleave:  # pairs (x0, x1), (x2, x3), ... -> halves, then the half-split rotation
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        return apply_rope(x, step.cos, step.sin)

    def __call__(self, x: torch.Tensor, step: StepContext) -> torch.Tensor:
        c = self.c
        T, nh, r = x.shape[0], c.num_heads, c.kv_lora_rank
        q, kv_c, k_pe = self.proj_a(x).split(self.splits, dim=-1)
        if self.q_b is not None:
            q = self.q_b(rms_norm(q, self.q_a_norm, LORA_NORM_EPS))
        q_nope, q_pe = q.view(T, nh, -1).split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        c_kv = rms_norm(kv_c, self.kv_a_norm, LORA_NORM_EPS)  # [T, r]
        latent = torch.cat((c_kv.unsqueeze(1), self._rope(k_pe.view(T, 1, -1), step)), dim=-1)  # [T, 1, r + dr]
        step.kv_cache.write(step.layer, step.meta.slot_mapping, latent, None)
        q_latent = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)  # [T, nh, r]
        q_full = torch.cat((q_latent, self._rope(q_pe, step)), dim=-1) * self.q_scale  # [T, nh, r + dr]
        out = self.attention(q_full, latent, latent, step.layer, step.meta, step.kv_cache)  # [T, nh, r + dr]
        v = torch.bmm(out[..., :r].transpose(0, 1), self.w_uv).transpose(0, 1)  # [T, nh, dv]
        return self.o(v.reshape(T, nh * c.v_head_dim))


def load_mla(c: DeepseekConfig, ckpt: Checkpoint, prefix: str, attention: Attention, opts: BuildOptions) -> MLAttention:
    p, H, nh = prefix + "self_attn.", c.hidden_size, c.num_heads
    qk_head = c.qk_nope_head_dim + c.qk_rope_head_dim
    kv_a = ckpt.take(p + "kv_a_proj_with_mqa.weight", (c.kv_lora_rank + c.qk_rope_head_dim, H))
    q_a_norm = q_b = None
    if c.q_lora_rank is None:
        q_a = ckpt.take(p + "q_proj.weight", (nh * qk_head, H))
    else:
        q_a = ckpt.take(p + "q_a_proj.weight", (c.q_lora_rank, H))
        q_a_norm = ckpt.take(p + "q_a_layernorm.weight", (c.q_lora_rank,))
        q_b = opts.linear(ckpt.take(p + "q_b_proj.weight", (nh * qk_head, c.q_lora_rank)))
    return MLAttention(
        c, opts.linear(torch.cat([q_a, kv_a]).contiguous()), q_a_norm, q_b,
        ckpt.take(p + "kv_a_layernorm.weight", (c.kv_lora_rank,)),
        ckpt.take(p + "kv_b_proj.weight", (nh * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)),
        opts.linear(ckpt.take(p + "o_proj.weight", (H, nh * c.v_head_dim))), attention)


def load_moe(c: DeepseekConfig, ckpt: Checkpoint, prefix: str, opts: BuildOptions) -> SparseMoE:
    p = prefix + "mlp."
    bias = None
    if c.scoring == "sigmoid":
        bias = ckpt.take_float32(p + "gate.e_score_correction_bias", (c.num_experts,))
    router = Router(ckpt.take_float32(p + "gate.weight", (c.num_experts, c.hidden_size)), c.num_experts_per_tok,
                    scoring=c.scoring, normalize=c.norm_topk_prob, scale=c.routed_scaling_factor,
                    num_groups=c.num_groups, topk_group=c.topk_group,
                    group_score="top2" if c.scoring == "sigmoid" else "max", bias=bias)
    experts = load_experts(ckpt, p + "experts.", c.num_experts, c.hidden_size, c.moe_intermediate_size, opts.linear)
    shared = None
    if c.n_shared_experts:
        shared = load_dense_mlp(ckpt, p + "shared_experts.", c.hidden_size,
                                c.moe_intermediate_size * c.n_shared_experts, opts.linear)
    return SparseMoE(router, experts, shared)


def build(config: ModelConfig, ckpt: Checkpoint, opts: BuildOptions) -> Decoder:
    c = config
    assert isinstance(c, DeepseekConfig)
    spec = c.kv_spec
    # The C++ kernel vectorises head_dim 64 and 128 only; on the latent (576 for DeepSeek, 288 in
    # benchmarks/mla_vs_mha.py) its scalar path prefilled 1024 tokens 3.2x slower than the reference
    # (SDPA) on this CPU, so `auto` means the reference here until the kernel covers the latent.
    backend = "reference" if opts.attention_backend == "auto" else opts.attention_backend
    attention = make_attention(backend, ckpt.device, c.num_heads, spec.num_kv_heads, spec.head_dim)
    rope = Rope(c.inv_freq(), opts.max_positions, torch.device(ckpt.device), scale=c.rope_attention_factor)
    return build_decoder(
        c, ckpt, opts, attention.name, rope=rope,
        attn=lambda i, p: load_mla(c, ckpt, p, attention, opts),
        mlp=lambda i, p: (load_moe(c, ckpt, p, opts) if c.sparse_layers[i] else
                          load_dense_mlp(ckpt, p + "mlp.", c.hidden_size, c.intermediate_size, opts.linear)))


FAMILY = ModelFamily(
    name="deepseek",
    architectures=("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"),
    parse_config=parse_config,
    build=build,
    notes="MLA with the latent KV cache; RoPE default or yarn; multi-token-prediction layers and FP8 "
          "checkpoints (`quantization_config`) are not supported",
)
