"""The trained built-in model (`pdserve make-model --size tiny-copy`): the tiny shape (RoPE base 1e8)
that continues a repeated passage by copying it, which a randomly drawn model never does.

Why: speculation by n-gram lookup pays only when the model's next tokens appeared earlier in the
sequence (a code edit that quotes the code it changes). A random model has no induction heads: given
a prompt that contains a passage and then the passage's first words again, it does not continue with
the passage, so the n-gram proposer's proposals are all rejected (docs/speculative.md).

How: trained from scratch on this CPU, induction did not form within the budget (600 and 1000 steps,
~10 minutes: copied tokens predicted no better than others, docs/speculative.md). So training starts
from `wired_weights`, a 2-gram induction circuit set by hand in layers 0-1 (previous-token heads by
rotary phase, a content-matching head on the slowly rotating planes), and then trains all weights
for a few minutes on the built-in tokenizer's own corpus (the standard library's top-level sources,
see builtin_model.py) in windows where spans of the text, or of random tokens, are repeated later in
the window: it keeps copying and learns some of the text's statistics besides.

Owns the training data (`copy_batch`), a plain-torch Llama with the Hugging Face parameter names
(`TrainableLlama`: the same architecture the engine and transformers load), the wired start, the
training loop (`train_copier`: AdamW, a fixed number of steps, a wall-time bound, a progress line) and
the copy measurement (`copy_accuracy`). Deterministic: one seed draws the weights and every batch, and
the training runs on a fixed number of torch threads, so the same torch build on the same CPU writes
the same bytes (another CPU or build may round differently). Writing the checkpoint is builtin_model.py's job.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

# Bumped whenever what training produces changes (data, schedule, steps), so cached copies are retrained.
COPIER_VERSION = 1


@dataclass(frozen=True, slots=True)
class CopyTraining:
    steps: int = 200
    batch_size: int = 6
    seq_len: int = 384
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    seed: int = 0
    max_seconds: float = 900.0  # stop early (and say so) on a machine far slower than expected
    threads: int = 2  # torch threads while training: fixed, since the rounding depends on them
    progress_every: int = 25
    # The share of windows with copied spans (the rest are plain text), and the copied spans' lengths.
    copy_fraction: float = 0.75
    # The share of windows whose text is random tokens instead of the corpus: there only copying
    # predicts anything, which keeps the training from trading the copying away for the text's statistics.
    random_fraction: float = 0.25
    min_span: int = 8
    max_span: int = 96


# --- data ---------------------------------------------------------------------------------------

def corpus_ids(tokenizer_path: str) -> np.ndarray:
    """The built-in tokenizer's training text (stdlib sources), tokenized, files joined by </s>."""
    import numpy as np
    from tokenizers import Tokenizer

    from pdserve.engine.builtin_model import EOS_TOKEN_ID, _corpus_files

    tok = Tokenizer.from_file(tokenizer_path)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in _corpus_files()]
    out: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        out += enc.ids
        out.append(EOS_TOKEN_ID)
    return np.asarray(out, dtype=np.int64)


def copy_batch(ids: np.ndarray, gen: torch.Generator, cfg: CopyTraining) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` windows of `seq_len + 1` tokens of the corpus; in a `copy_fraction` of them, after an
    uncopied opening, spans of `min_span`..`max_span` tokens copied from earlier in the window follow each
    other with short uncopied gaps, so the text after the first token of a copy is predictable by copying. Returns (tokens [B, seq_len + 1],
    source [B, seq_len + 1]: the earlier position a token was copied from, -1 where it was not)."""
    import torch

    B, T = cfg.batch_size, cfg.seq_len + 1
    starts = torch.randint(0, len(ids) - T, (B,), generator=gen)
    tokens = torch.stack([torch.from_numpy(ids[s:s + T]) for s in starts.tolist()])
    vocab = int(ids.max()) + 1
    for b in range(B):
        if torch.rand((), generator=gen).item() < cfg.random_fraction:
            tokens[b] = torch.randint(3, vocab, (T,), generator=gen)  # past the special tokens
    source = torch.full((B, T), -1, dtype=torch.int64)
    for b in range(B):
        if torch.rand((), generator=gen).item() >= cfg.copy_fraction:
            continue
        # after an uncopied opening, spans copied from anywhere earlier (copies of copies included),
        # separated by short stretches of uncopied text
        pos = int(torch.randint(cfg.min_span, max(cfg.min_span + 1, T // 3), (), generator=gen))
        while True:
            span = int(torch.randint(cfg.min_span, cfg.max_span + 1, (), generator=gen))
            dst = pos + int(torch.randint(0, span // 2 + 1, (), generator=gen))
            span = min(span, T - dst, dst)
            if span < cfg.min_span:
                break
            src = int(torch.randint(0, dst - span + 1, (), generator=gen))
            tokens[b, dst:dst + span] = tokens[b, src:src + span].clone()
            source[b, dst:dst + span] = torch.arange(src, src + span)
            pos = dst + span
    return tokens, source


def induction_positions(source: torch.Tensor) -> torch.Tensor:
    """Positions whose token and the token before it were copied from consecutive positions: given the
    token before, an induction head (find its earlier occurrence, take the next token) predicts them."""
    import torch

    out = torch.zeros_like(source, dtype=torch.bool)
    out[:, 1:] = (source[:, 1:] >= 1) & (source[:, :-1] == source[:, 1:] - 1)
    return out


# --- the model ----------------------------------------------------------------------------------

def _model_classes():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, h: int, eps: float) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(h))
            self.eps = eps

        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    class Attention(nn.Module):
        def __init__(self, size) -> None:
            super().__init__()
            h, hd = size.hidden_size, size.head_dim
            self.nh, self.nkv, self.hd = size.num_heads, size.num_kv_heads, hd
            self.q_proj = nn.Linear(h, self.nh * hd, bias=False)
            self.k_proj = nn.Linear(h, self.nkv * hd, bias=False)
            self.v_proj = nn.Linear(h, self.nkv * hd, bias=False)
            self.o_proj = nn.Linear(self.nh * hd, h, bias=False)

        def forward(self, x, cos, sin):
            B, T, _ = x.shape
            q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)
            k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
            v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            rep = self.nh // self.nkv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, self.nh * self.hd))

    class MLP(nn.Module):
        def __init__(self, size) -> None:
            super().__init__()
            h, f = size.hidden_size, size.intermediate_size
            self.gate_proj = nn.Linear(h, f, bias=False)
            self.up_proj = nn.Linear(h, f, bias=False)
            self.down_proj = nn.Linear(f, h, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class Layer(nn.Module):
        def __init__(self, size) -> None:
            super().__init__()
            self.input_layernorm = RMSNorm(size.hidden_size, size.rms_norm_eps)
            self.self_attn = Attention(size)
            self.post_attention_layernorm = RMSNorm(size.hidden_size, size.rms_norm_eps)
            self.mlp = MLP(size)

        def forward(self, x, cos, sin):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin)
            return x + self.mlp(self.post_attention_layernorm(x))

    class Inner(nn.Module):
        def __init__(self, size) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(size.vocab_size, size.hidden_size)
            self.layers = nn.ModuleList(Layer(size) for _ in range(size.num_layers))
            self.norm = RMSNorm(size.hidden_size, size.rms_norm_eps)

    class TrainableLlama(nn.Module):
        """Hugging Face Llama's parameter names and arithmetic (RoPE by rotate-half, GQA, SwiGLU,
        untied lm_head), full-sequence causal forward only: for training."""

        def __init__(self, size) -> None:
            super().__init__()
            self.size = size
            self.model = Inner(size)
            self.lm_head = nn.Linear(size.hidden_size, size.vocab_size, bias=False)
            hd = size.head_dim
            self.register_buffer("inv_freq", 1.0 / size.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd),
                                 persistent=False)

        def forward(self, ids):
            T = ids.shape[1]
            freqs = torch.outer(torch.arange(T, dtype=torch.float32), self.inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)
            cos, sin = emb.cos(), emb.sin()
            x = self.model.embed_tokens(ids)
            for layer in self.model.layers:
                x = layer(x, cos, sin)
            return self.lm_head(self.model.norm(x))

    return TrainableLlama


def _rope(x, cos, sin):
    import torch

    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def new_model(size, seed: int):
    """A TrainableLlama of `size` (a builtin_model.BuiltinSize), initialised as Llama is (normal, std
    0.02; residual writers scaled by 1/sqrt(2 * layers)) from `seed`."""
    import torch

    torch.manual_seed(seed)
    model = _model_classes()(size)
    std = 0.02
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            continue
        scale = (2 * size.num_layers) ** -0.5 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
        with torch.no_grad():
            p.normal_(0.0, std * scale)
    return model


# --- the wired start: an induction circuit set by hand --------------------------------------------

# RoPE base of tiny-copy (tiny: 10000). The circuit needs both kinds of rotary planes: fast ones to find
# "the previous token" by position, and many nearly still ones (rotating < 0.6 rad over 1000 positions) to
# match tokens by content whatever their distance. At 10000 a 64-dim head has 8 such planes, at 1e8 it has 19.
COPIER_ROPE_THETA = 1e8
_TOKEN_DIMS = 60  # each of the residual stream's subspaces A (the token), B (the previous one), C (the one
_OFFSET_PLANES = 6  # before), D (the token to copy); the last dimension is constant
_CONTENT_PLANES = range(13, 32)


def wired_weights(size, seed: int, noise: float = 0.02, confidence: float = 40.0) -> dict[str, torch.Tensor]:
    """HF Llama tensors of `size` (rope_theta COPIER_ROPE_THETA, hidden >= 256, head_dim 64, 2+ layers,
    4 heads on 2 KV heads) holding a 2-gram induction circuit, the training's starting point:
    - embeddings: a random unit vector r_t per token in subspace A, and a constant coordinate;
    - layer 0, heads 0 and 2: query and key read only the constant coordinate, with rotary phases chosen so
      the score peaks at 1 (head 0) and 2 (head 2) positions back; their values copy A into B and C, so
      position m holds r of tokens m, m-1 and m-2;
    - layer 1, heads 0 and 2 (one half of r's matching dimensions each): query (A, B) against key (B, C) on
      the still planes, so position m attends where the two tokens before equal tokens m-1 and m; the
      value copies that position's A into D;
    - lm_head reads D: the logits favour the token that followed the earlier occurrence of the last 2 tokens.
    The other heads of layers 0 and 1 start at 0; the MLPs and layers 2+ normal with std `noise`, for training."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    h, hd, V, nh, nkv = size.hidden_size, size.head_dim, size.vocab_size, size.num_heads, size.num_kv_heads
    if h < 4 * _TOKEN_DIMS + 1 or hd != 64 or nh != 4 or nkv != 2 or size.num_layers < 2:
        raise ValueError(f"wired_weights: needs hidden >= {4 * _TOKEN_DIMS + 1}, head_dim 64, 4 heads on 2 KV heads, 2+ layers")
    half = hd // 2
    A, B, C, D = (slice(i * _TOKEN_DIMS, (i + 1) * _TOKEN_DIMS) for i in range(4))
    const = h - 1
    match = len(_CONTENT_PLANES)  # dimensions of r each layer-1 head matches on, per token
    # r_t: two matching pieces (one per layer-1 head) and the rest, each of norm 1/sqrt(3)
    r = torch.randn(V, _TOKEN_DIMS, generator=gen)
    for piece in (slice(0, match), slice(match, 2 * match), slice(2 * match, _TOKEN_DIMS)):
        r[:, piece] /= r[:, piece].norm(dim=1, keepdim=True) * math.sqrt(3)
    c = 1.0
    t: dict[str, torch.Tensor] = {}
    names = [("model.embed_tokens.weight", (V, h))]
    for i in range(size.num_layers):
        p = f"model.layers.{i}."
        names += [(p + "self_attn.q_proj.weight", (nh * hd, h)), (p + "self_attn.k_proj.weight", (nkv * hd, h)),
                  (p + "self_attn.v_proj.weight", (nkv * hd, h)), (p + "self_attn.o_proj.weight", (h, nh * hd)),
                  (p + "mlp.gate_proj.weight", (size.intermediate_size, h)),
                  (p + "mlp.up_proj.weight", (size.intermediate_size, h)),
                  (p + "mlp.down_proj.weight", (h, size.intermediate_size))]
        t[p + "input_layernorm.weight"] = torch.ones(h)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h)
    names.append(("lm_head.weight", (V, h)))
    wired = ("embed_tokens", "layers.0.self_attn", "layers.1.self_attn", "lm_head")
    for name, shape in names:
        t[name] = torch.zeros(*shape) if any(w in name for w in wired) else torch.randn(*shape, generator=gen) * noise
    t["model.norm.weight"] = torch.ones(h)
    E = t["model.embed_tokens.weight"]
    E[:, A], E[:, const] = r, c
    theta = size.rope_theta ** (-torch.arange(half, dtype=torch.float64) / half)
    # layer 0: the stream is [r_t, 0, 0, 0, c]; after the norm its constant coordinate is c / rms0
    rms0 = math.sqrt((1.0 + c * c) / h)
    L0 = "model.layers.0.self_attn."
    q, k, v, o = (t[L0 + n + "_proj.weight"] for n in "qkvo")
    amp = math.sqrt(900.0 / _OFFSET_PLANES) * rms0 / c  # peak score 900 / sqrt(hd) = 112 nats, ~12 over the next best
    for qhead, kvh, back, dst in ((0, 0, 1, B), (2, 1, 2, C)):
        for j in range(_OFFSET_PLANES):
            q[qhead * hd + j, const] = amp
            k[kvh * hd + j, const] = amp * math.cos(back * theta[j])
            k[kvh * hd + j + half, const] = amp * math.sin(back * theta[j])
        for d in range(_TOKEN_DIMS):
            v[kvh * hd + d, A.start + d] = 1.0
            o[dst.start + d, qhead * hd + d] = rms0
    # layer 1: the stream is [r_t, r_t-1, r_t-2, 0, c]
    rms1 = math.sqrt((3.0 + c * c) / h)
    L1 = "model.layers.1.self_attn."
    q, k, v, o = (t[L1 + n + "_proj.weight"] for n in "qkvo")
    dims = [j for j in _CONTENT_PLANES] + [j + half for j in _CONTENT_PLANES]
    now_dims, before_dims = dims[:match], dims[match:]
    s = math.sqrt(30.0 * math.sqrt(hd) * 3) * rms1  # a 2-gram match scores 60 nats, one token 30
    for qhead, kvh, piece in ((0, 0, 0), (2, 1, match)):
        for i in range(match):
            q[qhead * hd + now_dims[i], A.start + piece + i] = s
            q[qhead * hd + before_dims[i], B.start + piece + i] = s
            k[kvh * hd + now_dims[i], B.start + piece + i] = s
            k[kvh * hd + before_dims[i], C.start + piece + i] = s
        for d in range(_TOKEN_DIMS):
            v[kvh * hd + d, A.start + d] = 1.0
            o[D.start + d, qhead * hd + d] = rms1 * 0.5
    t["lm_head.weight"][:, D] = r * confidence * math.sqrt(3)
    return {name: w.float().contiguous() for name, w in t.items()}


# --- training -----------------------------------------------------------------------------------

def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def train_copier(size, ids: np.ndarray, cfg: CopyTraining = CopyTraining(),
                 progress: Callable[[str], None] = _stderr, init: dict[str, torch.Tensor] | None = None,
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    """Trains a `size` model on `copy_batch` windows of `ids`. Returns (HF-named float32 tensors, a
    summary: steps run, seconds, first and last losses, copy accuracy measured on held-out windows)."""
    import torch
    import torch.nn.functional as F

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        model = new_model(size, cfg.seed)
        if init is not None:
            model.load_state_dict(init, strict=True)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))

        def lr_at(step: int) -> float:
            if step < cfg.warmup_steps:
                return cfg.lr * (step + 1) / cfg.warmup_steps
            t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

        probe = replace(cfg, copy_fraction=1.0, random_fraction=0.0)  # measured on the corpus's text, copied
        started = time.monotonic()
        losses: list[float] = []
        step = 0
        model.train()
        for step in range(cfg.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            tokens, _ = copy_batch(ids, gen, cfg)
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            elapsed = time.monotonic() - started
            if (step + 1) % cfg.progress_every == 0 or step + 1 == cfg.steps:
                recent = losses[-cfg.progress_every:]
                model.eval()
                acc = copy_accuracy(model, ids, replace(probe, batch_size=4), seed=cfg.seed + 3)
                model.train()
                progress(f"training the copier: step {step + 1}/{cfg.steps}, loss {sum(recent) / len(recent):.3f}, "
                         f"next-token accuracy {acc['copied']:.2f} on copied spans, {acc['other']:.2f} elsewhere, "
                         f"{elapsed:.0f} s")
            if elapsed > cfg.max_seconds and step + 1 < cfg.steps:
                progress(f"training the copier: stopped at step {step + 1}/{cfg.steps}, over the {cfg.max_seconds:.0f} s "
                         "bound (this model copies less well than a full run's)")
                break
        model.eval()
        accuracy = copy_accuracy(model, ids, replace(probe, batch_size=8), seed=cfg.seed + 2)
        head = losses[:min(10, len(losses))]
        summary = {"steps": step + 1, "seconds": round(time.monotonic() - started, 1),
                   "first_loss": round(sum(head) / len(head), 4), "last_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
                   "copy_accuracy": round(accuracy["copied"], 4), "other_accuracy": round(accuracy["other"], 4),
                   "config": asdict(cfg), "version": COPIER_VERSION}
        progress(f"training the copier: done, {summary['steps']} steps in {summary['seconds']:.0f} s; teacher-forced "
                 f"next-token accuracy {accuracy['copied']:.3f} on copied spans, {accuracy['other']:.3f} elsewhere")
        tensors = {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}
        return tensors, summary
    finally:
        torch.set_num_threads(threads)


def copy_accuracy(model, ids: np.ndarray, cfg: CopyTraining, seed: int) -> dict[str, float]:
    """Teacher-forced greedy next-token accuracy of `model` on fresh `copy_batch` windows: on positions an
    induction head can predict (`induction_positions`) and on the others."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    tokens, source = copy_batch(ids, gen, cfg)
    with torch.no_grad():
        pred = model(tokens[:, :-1]).argmax(-1)
    hit = pred == tokens[:, 1:]
    mask = induction_positions(source)[:, 1:]
    return {"copied": hit[mask].float().mean().item() if mask.any() else float("nan"),
            "other": hit[~mask].float().mean().item()}
