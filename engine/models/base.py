"""What a model family provides to the engine, and the decoder skeleton the families share.

A family (`ModelFamily`) parses its config, names and loads its weights from a `Checkpoint`, and
builds a `DecoderModel` whose `forward` runs over the paged cache; the config's `kv_spec` says what
the cache stores per token. `Decoder` is the pre-norm residual stack every family here uses
(embedding, layers of attention + MLP, final norm, LM head); families differ in their attention and
MLP objects. Owns no attention kernels (`engine/attention.py`) and no cache memory (`kv_cache.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from pdserve.engine.attention import AttentionMetadata
from pdserve.engine.kv_cache import PagedKVCache
from pdserve.engine.linear import Linear
from pdserve.engine.loader import Checkpoint
from pdserve.engine.model_config import ConfigReader, ModelConfig
from pdserve.engine.ops import TORCH_OPS, TorchOps, apply_rope, make_ops  # noqa: F401 - apply_rope re-exported
from pdserve.errors import InvalidModel

LayerCallback = Callable[[int], None]


rms_norm = TorchOps.rms_norm  # the reference RMSNorm (layers also use it for q/k norms)


@dataclass(frozen=True, slots=True)
class BuildOptions:
    """How the engine wants the model built (from EngineConfig)."""

    max_positions: int
    attention_backend: str  # "auto", "paged-cpu", "reference"
    linear: Callable[..., Linear]  # linear-layer constructor (oneDNN-packed or plain torch)


class DecoderModel(Protocol):
    config: ModelConfig
    device: torch.device
    attention_name: str

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: PagedKVCache, on_layer_done: LayerCallback | None = None) -> torch.Tensor:
        """input_ids, positions: [T]. Writes the step's KV into the cache; returns final-norm hidden [T, hidden]."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [rows, vocab]."""
        ...


@dataclass(frozen=True, slots=True)
class ModelFamily:
    """One registered family: the architectures it serves, its config parser and its model builder."""

    name: str
    architectures: tuple[str, ...]
    parse_config: Callable[[ConfigReader, str], ModelConfig]  # (reader, architecture) -> config
    build: Callable[[ModelConfig, Checkpoint, BuildOptions], DecoderModel]
    notes: str = ""  # what the README's model table says is not supported


class Rope:
    """Rotary tables for positions [0, max_positions): cos/sin [max_positions, dim] in float32 (the
    half-split layout, as transformers' rotate_half), optionally scaled (yarn's attention factor)."""

    def __init__(self, inv_freq: torch.Tensor, max_positions: int, device: torch.device, scale: float = 1.0) -> None:
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, dim]
        self.cos, self.sin = (emb.cos() * scale).to(device), (emb.sin() * scale).to(device)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, dim] in the model's dtype (tables are float32; applied in the model's dtype, as transformers does)."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


class LayerPart(Protocol):
    """A layer's attention or MLP: maps the normed hidden states [T, hidden] to the residual update."""

    def __call__(self, x: torch.Tensor, step: "StepContext") -> torch.Tensor:
        ...


@dataclass(slots=True)
class StepContext:
    """What every layer of one step shares: positions' rotary values, attention metadata, the cache."""

    cos: torch.Tensor  # [T, 1, rope_dim]
    sin: torch.Tensor
    meta: AttentionMetadata
    kv_cache: PagedKVCache
    layer: int = 0
    ops: TorchOps = TORCH_OPS  # the elementwise ops (reference or fused kernels), see engine/ops.py


@dataclass(slots=True)
class DecoderLayer:
    input_norm: torch.Tensor  # [hidden]
    attn: LayerPart
    post_norm: torch.Tensor  # [hidden]
    mlp: LayerPart


class Decoder:
    """Pre-norm residual decoder: h += attn(norm(h)); h += mlp(norm(h)), layer by layer."""

    def __init__(self, config: ModelConfig, embed: torch.Tensor, layers: list[DecoderLayer], norm: torch.Tensor,
                 lm_head: Linear, rope: Rope, attention_name: str, ops: TorchOps = TORCH_OPS) -> None:
        self.config = config
        self.embed = embed  # [vocab, hidden]
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        self.rope = rope
        self.attention_name = attention_name
        self.ops = ops
        self.device = embed.device

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: PagedKVCache, on_layer_done: LayerCallback | None = None) -> torch.Tensor:
        """`on_layer_done(i)` runs once layer i's KV is in the cache (the transfer layer's hook for
        pushing KV while later layers still compute)."""
        eps, ops = self.config.rms_norm_eps, self.ops
        h = F.embedding(input_ids, self.embed)
        cos, sin = self.rope.lookup(positions, self.embed.dtype)
        step = StepContext(cos, sin, meta, kv_cache, ops=ops)
        # each residual add is fused with the norm after it: h += part(x); x = norm(h)
        x = ops.rms_norm(h, self.layers[0].input_norm, eps) if self.layers else h
        for i, layer in enumerate(self.layers):
            step.layer = i
            h, x = ops.add_rms_norm(h, layer.attn(x, step), layer.post_norm, eps)
            next_norm = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
            h, x = ops.add_rms_norm(h, layer.mlp(x, step), next_norm, eps)
            if on_layer_done is not None:
                on_layer_done(i)
        return x if self.layers else ops.rms_norm(h, self.norm, eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits whatever the model's dtype, so sampling and logprobs are computed in full precision."""
        return self.lm_head(hidden).float()


def build_decoder(config: ModelConfig, ckpt: Checkpoint, opts: BuildOptions, attention_name: str,
                  attn: Callable[[int, str], LayerPart], mlp: Callable[[int, str], LayerPart],
                  rope: Rope | None = None) -> Decoder:
    """The decoder stack with the Hugging Face layer names: `attn(i, prefix)` and `mlp(i, prefix)` build
    layer i's parts (prefix 'model.layers.{i}.'); `rope` defaults to the config's frequencies."""
    c = config
    layers = []
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        layers.append(DecoderLayer(input_norm=ckpt.take(p + "input_layernorm.weight", (c.hidden_size,)),
                                   attn=attn(i, p),
                                   post_norm=ckpt.take(p + "post_attention_layernorm.weight", (c.hidden_size,)),
                                   mlp=mlp(i, p)))
    embed, norm, lm_head = embeddings_and_head(c, ckpt, opts.linear)
    rope = rope or Rope(c.inv_freq(), opts.max_positions, embed.device)
    return Decoder(c, embed, layers, norm, lm_head, rope, attention_name,
                   ops=make_ops(opts.attention_backend, str(ckpt.device)))


def embeddings_and_head(config: ModelConfig, ckpt: Checkpoint, linear: Callable[..., Linear]
                        ) -> tuple[torch.Tensor, torch.Tensor, Linear]:
    """(embedding [vocab, hidden], final norm [hidden], LM head), the head tied to the embedding when configured."""
    c = config
    embed = ckpt.take("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))
    if c.tie_word_embeddings or not ckpt.has("lm_head.weight"):
        if not c.tie_word_embeddings:
            raise InvalidModel(f"{ckpt.source}: weight 'lm_head.weight' is missing and tie_word_embeddings is false")
        lm_head = embed
    else:
        lm_head = ckpt.take("lm_head.weight", (c.vocab_size, c.hidden_size))
    return embed, ckpt.take("model.norm.weight", (c.hidden_size,)), linear(lm_head)
