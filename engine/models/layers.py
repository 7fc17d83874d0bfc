"""Layer parts the families share: grouped-query attention over the paged cache (optional q/k bias
and per-head q/k RMSNorm) and the gated SiLU MLP, with their checkpoint loaders (Hugging Face names)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pdserve.engine.attention import Attention
from pdserve.engine.linear import Linear
from pdserve.engine.model_config import ModelConfig
from pdserve.engine.models.base import Checkpoint, StepContext, rms_norm
from pdserve.engine.ops import TORCH_OPS


class GQAttention:
    """q, k, v from one fused projection; RoPE; K/V written to the cache; attention through the
    engine's attention backend; output projection."""

    def __init__(self, config: ModelConfig, qkv: Linear, o: Linear, attention: Attention,
                 q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None) -> None:
        c = config
        self.qkv, self.o, self.attention = qkv, o, attention
        self.q_norm, self.k_norm = q_norm, k_norm  # [head_dim] each (Qwen3), or None
        self.nh, self.nkv, self.hd, self.eps = c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps
        self.q_size, self.kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

    def __call__(self, x: torch.Tensor, step: StepContext) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.nh, self.hd)
        k = k.view(T, self.nkv, self.hd)
        v = v.view(T, self.nkv, self.hd)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, self.eps)
            k = rms_norm(k, self.k_norm, self.eps)
        q, k = step.ops.rope(q, k, step.cos, step.sin)
        step.kv_cache.write(step.layer, step.meta.slot_mapping, k, v)
        attn = self.attention(q, k, v, step.layer, step.meta, step.kv_cache)
        return self.o(attn.view(T, self.q_size))


def load_gqa(config: ModelConfig, ckpt: Checkpoint, prefix: str, attention: Attention,
             linear: Callable[..., Linear], qk_norm: bool = False) -> GQAttention:
    """`prefix` is the layer's, e.g. 'model.layers.0.'; reads `self_attn.{q,k,v,o}_proj` (+ bias, + q/k norm)."""
    c = config
    p = prefix + "self_attn."
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    qkv = torch.cat([
        ckpt.take(p + "q_proj.weight", (q_out, c.hidden_size)),
        ckpt.take(p + "k_proj.weight", (kv_out, c.hidden_size)),
        ckpt.take(p + "v_proj.weight", (kv_out, c.hidden_size)),
    ]).contiguous()
    bias = None
    if c.qkv_bias:
        bias = torch.cat([ckpt.take(p + "q_proj.bias", (q_out,)), ckpt.take(p + "k_proj.bias", (kv_out,)),
                          ckpt.take(p + "v_proj.bias", (kv_out,))])
    q_norm = k_norm = None
    if qk_norm:
        q_norm = ckpt.take(p + "q_norm.weight", (c.head_dim,))
        k_norm = ckpt.take(p + "k_norm.weight", (c.head_dim,))
    o = ckpt.take(p + "o_proj.weight", (c.hidden_size, q_out))
    return GQAttention(c, linear(qkv, bias), linear(o), attention, q_norm, k_norm)


class DenseMLP:
    """down(silu(gate(x)) * up(x)), gate and up fused into one projection."""

    def __init__(self, gate_up: Linear, down: Linear) -> None:
        self.gate_up, self.down = gate_up, down

    def __call__(self, x: torch.Tensor, step: StepContext | None = None) -> torch.Tensor:
        return self.down((step.ops if step is not None else TORCH_OPS).silu_mul(self.gate_up(x)))


def load_dense_mlp(ckpt: Checkpoint, prefix: str, hidden: int, intermediate: int, linear: Callable[..., Linear],
                   names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> DenseMLP:
    """`prefix` ends with the MLP's module path and a dot, e.g. 'model.layers.0.mlp.'."""
    gate, up, down = names
    gate_up = torch.cat([ckpt.take(f"{prefix}{gate}.weight", (intermediate, hidden)),
                         ckpt.take(f"{prefix}{up}.weight", (intermediate, hidden))]).contiguous()
    return DenseMLP(linear(gate_up), linear(ckpt.take(f"{prefix}{down}.weight", (hidden, intermediate))))
