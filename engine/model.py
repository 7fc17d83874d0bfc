"""The transformer forward pass (Llama / Qwen2) over the paged KV cache, in plain torch.

Tokens of all sequences in a step are flattened to one `[T, hidden]` batch; attention reads
each sequence's K/V from the cache through its slots. Prefill chunks (several query tokens) are
attended one sequence at a time; single-token decodes are attended together, padded to the
longest context in the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pdserve.engine.kv_cache import PagedKVCache
from pdserve.engine.loader import ModelWeights
from pdserve.engine.model_config import ModelConfig


@dataclass(slots=True)
class PrefillSegment:
    """One sequence with several new tokens: rows [q_start, q_start + q_len) of the batch."""

    q_start: int
    q_len: int
    block_table: torch.Tensor  # [num_blocks] blocks holding the whole context, the new tokens last
    ctx_len: int
    mask: torch.Tensor | None  # [q_len, ctx_len] bool, None when ctx_len == q_len (plain causal)


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    prefills: list[PrefillSegment] = field(default_factory=list)
    decode_rows: torch.Tensor | None = None  # [B] batch rows holding single-token decodes
    decode_block_tables: torch.Tensor | None = None  # [B, max_blocks] (padding points at block 0)
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, max_blocks * block_size] bool: True where real

    def to(self, device: torch.device) -> AttentionMetadata:
        """The same metadata with every tensor on `device` (itself when that is where they are)."""
        if self.slot_mapping.device == device:
            return self

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)
        return AttentionMetadata(
            slot_mapping=move(self.slot_mapping),
            prefills=[PrefillSegment(p.q_start, p.q_len, move(p.block_table), p.ctx_len, move(p.mask))
                      for p in self.prefills],
            decode_rows=move(self.decode_rows), decode_block_tables=move(self.decode_block_tables),
            decode_mask=move(self.decode_mask))


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

    def __init__(self, config: ModelConfig, weights: ModelWeights, max_positions: int) -> None:
        self.config = config
        self.w = weights
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), config.inv_freq())
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.device = weights.embed.device
        self.cos, self.sin = emb.cos().to(self.device), emb.sin().to(self.device)
        c = config
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
        h = F.embedding(input_ids, self.w.embed)
        dtype = self.w.embed.dtype  # rotary tables are float32; applied in the model's dtype, as transformers does
        cos = self.cos[positions].unsqueeze(1).to(dtype)  # [T, 1, hd]
        sin = self.sin[positions].unsqueeze(1).to(dtype)
        for i, lw in enumerate(self.w.layers):
            x = rms_norm(h, lw.input_norm, c.rms_norm_eps)
            qkv = F.linear(x, lw.qkv, lw.qkv_bias)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(T, c.num_heads, c.head_dim)
            k = k.view(T, c.num_kv_heads, c.head_dim)
            v = v.view(T, c.num_kv_heads, c.head_dim)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            kv_cache.write(i, meta.slot_mapping, k, v)
            attn = self._attention(q, k, v, i, meta, kv_cache)
            h = h + F.linear(attn.view(T, self.q_size), lw.o)
            x = rms_norm(h, lw.post_norm, c.rms_norm_eps)
            gate, up = F.linear(x, lw.gate_up).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, lw.down)
            if on_layer_done is not None:
                on_layer_done(i)
        return rms_norm(h, self.w.norm, c.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits whatever the model's dtype, so sampling and logprobs are computed in full precision."""
        return F.linear(hidden, self.w.lm_head).float()

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                   meta: AttentionMetadata, kv_cache: PagedKVCache) -> torch.Tensor:
        out = torch.empty_like(q)  # [T, nh, hd]
        # Gathering whole blocks (block_size rows at a time) is ~3x faster than gathering slots.
        k_blocks, v_blocks = kv_cache.layer_blocks(layer)  # [num_blocks, block_size, nkv, hd]
        nkv, hd = self.config.num_kv_heads, self.config.head_dim
        gqa = self.config.num_heads != nkv
        for seg in meta.prefills:
            rows = slice(seg.q_start, seg.q_start + seg.q_len)
            if seg.mask is None:  # the whole context is new: use the fresh K/V, skip the gather
                ks, vs = k[rows], v[rows]
            else:
                ks = torch.index_select(k_blocks, 0, seg.block_table).view(-1, nkv, hd)[:seg.ctx_len]
                vs = torch.index_select(v_blocks, 0, seg.block_table).view(-1, nkv, hd)[:seg.ctx_len]
            o = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1).unsqueeze(0), ks.transpose(0, 1).unsqueeze(0),
                vs.transpose(0, 1).unsqueeze(0), attn_mask=seg.mask, is_causal=seg.mask is None, enable_gqa=gqa,
            )  # [1, nh, q_len, hd]
            out[rows] = o[0].transpose(0, 1)
        if meta.decode_rows is not None:
            assert meta.decode_block_tables is not None
            B = meta.decode_block_tables.shape[0]
            qd = q[meta.decode_rows].unsqueeze(2)  # [B, nh, 1, hd]
            flat_tables = meta.decode_block_tables.view(-1)  # index_select: ~1.6x faster than advanced indexing
            kd = torch.index_select(k_blocks, 0, flat_tables).view(B, -1, nkv, hd).transpose(1, 2)  # [B, nkv, L, hd]
            vd = torch.index_select(v_blocks, 0, flat_tables).view(B, -1, nkv, hd).transpose(1, 2)
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, enable_gqa=gqa)
            out[meta.decode_rows] = o.squeeze(2)
        return out
