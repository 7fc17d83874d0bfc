"""The transformer forward pass (Llama / Qwen2) over the paged KV cache.

Tokens of all sequences in a step are flattened to one `[T, hidden]` batch; attention
(`attention.py`) reads each sequence's K/V from the cache through its block table. The linear
layers come from `linear.py` (oneDNN-packed on the CPU, plain torch elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.engine.attention import Attention, AttentionMetadata, ReferenceAttention
from pdserve.engine.kv_cache import PagedKVCache
from pdserve.engine.linear import Linear
from pdserve.engine.loader import ModelWeights
from pdserve.engine.model_config import ModelConfig


@dataclass(slots=True)
class _Layer:
    """One decoder layer in compute form: norms as tensors, projections as (possibly packed) linears."""

    input_norm: torch.Tensor
    qkv: Linear
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear


LayerCallback = Callable[[int], None]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back (as transformers does for half-precision models)."""
    xf = x.float()
    variance = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(variance + eps)).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Transformer:
    """Llama-family decoder. `forward` writes the new tokens' K/V into the cache and returns hidden states."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, max_positions: int,
                 attention: Attention | None = None, linear: Callable[..., Linear] = Linear) -> None:
        self.config = config
        c = config
        self.embed = weights.embed
        self.norm = weights.norm
        # Built once from the loaded tensors; a packed linear keeps no plain copy of its weight.
        self.layers = [_Layer(lw.input_norm, linear(lw.qkv, lw.qkv_bias), linear(lw.o), lw.post_norm,
                              linear(lw.gate_up), linear(lw.down)) for lw in weights.layers]
        self.lm_head = linear(weights.lm_head)
        self.attention = attention or ReferenceAttention(c.num_heads, c.num_kv_heads, c.head_dim)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), config.inv_freq())
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.device = weights.embed.device
        self.cos, self.sin = emb.cos().to(self.device), emb.sin().to(self.device)
        self.q_size, self.kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: PagedKVCache, on_layer_done: LayerCallback | None = None) -> torch.Tensor:
        """input_ids, positions: [T]. Returns final-norm hidden states [T, hidden].

        `on_layer_done(i)` runs once layer i's K/V are in the cache (the transfer layer's hook
        for pushing KV while later layers still compute).
        """
        c = self.config
        T = input_ids.shape[0]
        h = F.embedding(input_ids, self.embed)
        dtype = self.embed.dtype  # rotary tables are float32; applied in the model's dtype, as transformers does
        cos = self.cos[positions].unsqueeze(1).to(dtype)  # [T, 1, hd]
        sin = self.sin[positions].unsqueeze(1).to(dtype)
        for i, lw in enumerate(self.layers):
            x = rms_norm(h, lw.input_norm, c.rms_norm_eps)
            qkv = lw.qkv(x)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(T, c.num_heads, c.head_dim)
            k = k.view(T, c.num_kv_heads, c.head_dim)
            v = v.view(T, c.num_kv_heads, c.head_dim)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            kv_cache.write(i, meta.slot_mapping, k, v)
            attn = self.attention(q, k, v, i, meta, kv_cache)
            h = h + lw.o(attn.view(T, self.q_size))
            x = rms_norm(h, lw.post_norm, c.rms_norm_eps)
            gate, up = lw.gate_up(x).chunk(2, dim=-1)
            h = h + lw.down(F.silu(gate) * up)
            if on_layer_done is not None:
                on_layer_done(i)
        return rms_norm(h, self.norm, c.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits whatever the model's dtype, so sampling and logprobs are computed in full precision."""
        return self.lm_head(hidden).float()
