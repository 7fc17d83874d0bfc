"""Write the built-in Llama-format checkpoint (`pdserve make-model`): deterministic from a seed, no download.

Owns the two sizes, their drafts and the trained tiny-copy (its training: builtin_copier.py), the byte-level BPE trained on this Python's standard library, the weight
initialisation (chosen so greedy decoding does not collapse into a short loop, which the token
parity tests need), and the per-user model cache. Loading the checkpoint is `loader.py`'s job.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sysconfig
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pdserve.engine.tokenizer import DEFAULT_CHAT_TEMPLATE

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Bumped whenever the bytes a (size, seed) produces change, so cached copies are rebuilt.
BUILTIN_FORMAT_VERSION = 1

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2


@dataclass(frozen=True, slots=True)
class BuiltinSize:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


SIZES: dict[str, BuiltinSize] = {
    "tiny": BuiltinSize(num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=688,
                        vocab_size=2048),
    "small": BuiltinSize(num_layers=12, hidden_size=768, num_heads=12, num_kv_heads=4, intermediate_size=2048,
                         vocab_size=32000),
}

# Draft sizes for speculative decoding: a base size's own weights (same seed) stored in bfloat16, half
# the bytes a token reads, with the base size's tokenizer. The built-in models are random: a draft drawn
# apart, or cut to fewer layers, agrees with them little more than chance (measured: 26-42 % of greedy
# choices for 1-6 of small's 12 layers), while rounding to bfloat16 keeps ~99 % (docs/speculative.md).
DRAFT_SIZES: dict[str, str] = {"tiny-draft": "tiny", "small-draft": "small"}
DRAFT_DTYPE = "bfloat16"

# Trained sizes: a base size's shape and tokenizer, its weights trained for a few minutes on this CPU at first
# use instead of drawn (builtin_copier.py: from a hand-wired induction circuit, RoPE base 1e8): "tiny-copy"
# continues a repeated passage by copying it, the case n-gram speculation is for, which no random model does.
# Its config.json names it in `pdserve_builtin_size`; it has no built-in draft.
TRAINED_SIZES: dict[str, str] = {"tiny-copy": "tiny"}


def base_size(size: str) -> str:
    """The size whose shape and tokenizer a built-in size uses (itself for tiny and small)."""
    return DRAFT_SIZES.get(size) or TRAINED_SIZES.get(size) or size


def all_sizes() -> list[str]:
    return [*SIZES, *DRAFT_SIZES, *TRAINED_SIZES]


def builtin_draft_for(model_dir: str | Path) -> Path | None:
    """The cached built-in draft of a built-in model directory (made on first use), None for other models.
    Kept beside the model when it lies in a model cache (`<size>-seed0`), else in the default cache."""
    model_dir = Path(model_dir)
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if config.get("pdserve_builtin_version") is None:
        return None
    base = next((s for s, spec in SIZES.items() if _model_config(spec) == config), None)
    if base is None:
        return None
    draft = next(d for d, b in DRAFT_SIZES.items() if b == base)
    cache_dir = model_dir.parent if model_dir.name == f"{base}-seed0" else None
    return ensure_builtin_model(draft, cache_dir=cache_dir)


# --- tokenizer --------------------------------------------------------------------------------

def _corpus_files() -> list[Path]:
    """The training text: every top-level stdlib module plus the pydoc topics (~5 MB of code and prose).

    Same bytes on every install of the same Python version; another patch release may train a
    slightly different tokenizer.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    files += [p for p in [stdlib / "pydoc_data" / "topics.py"] if p.is_file()]
    if len(files) < 50:
        raise RuntimeError(f"{stdlib}: found only {len(files)} standard-library sources to train the tokenizer on")
    return files


def train_tokenizer(vocab_size: int):  # -> tokenizers.Tokenizer
    """A byte-level BPE with exactly `vocab_size` ids: <unk>=0, <s>=1, </s>=2, then 256 bytes, then merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    texts = [p.read_text(encoding="utf-8", errors="replace") for p in _corpus_files()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"trained {tokenizer.get_vocab_size()} tokens, wanted {vocab_size}: corpus too small")
    # `encode(add_special_tokens=True)` prepends <s>, as Llama's tokenizer does.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_TOKEN_ID)])
    return tokenizer


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",  # not LlamaTokenizer: that one rebuilds a sentencepiece pipeline
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": DEFAULT_CHAT_TEMPLATE,
    }


# --- weights ----------------------------------------------------------------------------------

def _model_config(size: BuiltinSize) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": size.vocab_size,
        "hidden_size": size.hidden_size,
        "intermediate_size": size.intermediate_size,
        "num_hidden_layers": size.num_layers,
        "num_attention_heads": size.num_heads,
        "num_key_value_heads": size.num_kv_heads,
        "head_dim": size.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": size.max_position_embeddings,
        "rms_norm_eps": size.rms_norm_eps,
        "rope_theta": size.rope_theta,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
        "pdserve_builtin_version": BUILTIN_FORMAT_VERSION,
    }


# Initialisation gains. A plain small-std init makes every position's logits nearly the same
# flat distribution, so greedy decoding repeats one token. Instead: unit-variance embeddings carry
# the current token strongly; q/k with gain QK_GAIN give attention scores of std ~QK_GAIN**2 so
# heads attend selectively and the context changes the output; residual writers (o, down) are
# scaled by 1/sqrt(2 * layers) so no layer drowns the others; lm_head with gain LM_HEAD_GAIN gives
# logits of std ~LM_HEAD_GAIN, far enough apart that float32 summation order never flips argmax.
EMBED_STD = 1.0
QK_GAIN = 1.5
VO_GAIN = 1.0
MLP_GAIN = 1.0
LM_HEAD_GAIN = 6.0


def init_weights(size: BuiltinSize, seed: int) -> dict[str, torch.Tensor]:
    """HF Llama tensors, float32, drawn in a fixed order from one seeded generator."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    h, hd, ffn = size.hidden_size, size.head_dim, size.intermediate_size
    residual_scale = (2 * size.num_layers) ** -0.5

    def normal(rows: int, cols: int, std: float) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen, dtype=torch.float32) * std

    def norm_weight() -> torch.Tensor:
        return torch.ones(h, dtype=torch.float32)

    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(size.vocab_size, h, EMBED_STD)}
    for i in range(size.num_layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = norm_weight()
        tensors[p + "self_attn.q_proj.weight"] = normal(size.num_heads * hd, h, QK_GAIN / h**0.5)
        tensors[p + "self_attn.k_proj.weight"] = normal(size.num_kv_heads * hd, h, QK_GAIN / h**0.5)
        tensors[p + "self_attn.v_proj.weight"] = normal(size.num_kv_heads * hd, h, VO_GAIN / h**0.5)
        tensors[p + "self_attn.o_proj.weight"] = normal(h, size.num_heads * hd, VO_GAIN * residual_scale / (size.num_heads * hd) ** 0.5)
        tensors[p + "post_attention_layernorm.weight"] = norm_weight()
        tensors[p + "mlp.gate_proj.weight"] = normal(ffn, h, MLP_GAIN / h**0.5)
        tensors[p + "mlp.up_proj.weight"] = normal(ffn, h, MLP_GAIN / h**0.5)
        tensors[p + "mlp.down_proj.weight"] = normal(h, ffn, MLP_GAIN * residual_scale / ffn**0.5)
    tensors["model.norm.weight"] = norm_weight()
    tensors["lm_head.weight"] = normal(size.vocab_size, h, LM_HEAD_GAIN / h**0.5)
    return tensors


# --- the checkpoint ---------------------------------------------------------------------------

def make_model(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
    generation_config.json into `out_dir` (created if needed); the same (size, seed) gives the
    same bytes."""
    from safetensors.torch import save_file

    if size not in all_sizes():
        raise ValueError(f"unknown built-in model size {size!r} (choose from {', '.join(all_sizes())})")
    base = base_size(size)
    spec = SIZES[base]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    write_tokenizer(out_dir, base)
    config = _model_config(spec)
    if size in TRAINED_SIZES:
        from pdserve.engine.builtin_copier import (COPIER_ROPE_THETA, CopyTraining, corpus_ids, train_copier,
                                                   wired_weights)

        logger.info("training the %s model (seed %d)", size, seed)
        spec = replace(spec, rope_theta=COPIER_ROPE_THETA)
        config = _model_config(spec)
        tensors, summary = train_copier(spec, corpus_ids(str(out_dir / "tokenizer.json")),
                                        replace(CopyTraining(), seed=seed), init=wired_weights(spec, seed))
        summary.pop("seconds")  # the rest is the same on every run (same torch build and CPU)
        config.update(pdserve_builtin_size=size, pdserve_copier=summary)
    else:
        logger.info("drawing weights (seed %d)", seed)
        tensors = init_weights(spec, seed)
    if size in DRAFT_SIZES:
        import torch

        config["torch_dtype"] = DRAFT_DTYPE
        tensors = {name: t.to(getattr(torch, DRAFT_DTYPE)) for name, t in tensors.items()}
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json",
                {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID, "do_sample": False})
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def write_tokenizer(out_dir: str | Path, size: str = "tiny") -> Path:
    """Writes only tokenizer.json and tokenizer_config.json of a built-in size (no torch needed)."""
    size = base_size(size)
    if size not in SIZES:
        raise ValueError(f"unknown built-in model size {size!r} (choose from {', '.join(SIZES)})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    logger.info("training the %d-token byte-level BPE tokenizer on the standard library", SIZES[size].vocab_size)
    tokenizer = train_tokenizer(SIZES[size].vocab_size)
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=True)
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config())
    logger.info("tokenizer trained in %.1f s", time.monotonic() - started)
    return out_dir


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def count_params(size: str) -> int:
    """Parameters of a built-in size, computed from its shapes (no weights drawn)."""
    s = SIZES[base_size(size)]
    h, kv = s.hidden_size, s.num_kv_heads * s.head_dim
    per_layer = 2 * h + 2 * h * s.num_heads * s.head_dim + 2 * h * kv + 3 * h * s.intermediate_size
    return 2 * s.vocab_size * h + h + s.num_layers * per_layer


def default_cache_dir() -> Path:
    """$PDSERVE_MODEL_CACHE, else ~/.cache/pdserve/models."""
    env = os.environ.get("PDSERVE_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pdserve" / "models"


def _is_current(model_dir: Path) -> bool:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if config.get("pdserve_builtin_size") in TRAINED_SIZES:
        from pdserve.engine.builtin_copier import COPIER_VERSION

        if config.get("pdserve_copier", {}).get("version") != COPIER_VERSION:
            return False
    return config.get("pdserve_builtin_version") == BUILTIN_FORMAT_VERSION


def ensure_builtin_model(size: str = "tiny", cache_dir: str | Path | None = None) -> Path:
    """The cached built-in model (seed 0), made on first use: built in a temp dir, then renamed in."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_dir / f"{size}-seed0"
    if _is_current(final):
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_dir))
    try:
        make_model(tmp, size=size, seed=0)
        if final.exists():  # an older format, or a concurrent maker won the race
            if _is_current(final):
                return final
            shutil.rmtree(final)
        os.rename(tmp, final)
    except OSError:
        if not _is_current(final):
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built-in %s model cached at %s", size, final)
    return final


# --- CLI --------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=all_sizes(), default="tiny",
                        help="tiny (~4M params), small (~125M), or the draft of one of them for --speculative draft "
                             "(tiny-draft, small-draft: its weights in bfloat16, its tokenizer), or tiny-copy: "
                             "tiny trained for a few minutes on this CPU to continue a repeated passage by copying "
                             "it (what --speculative ngram pays on)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to write the checkpoint into")


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    print(f"making the built-in {args.size} model (seed {args.seed}); training its tokenizer takes a few seconds"
          + (", training its weights a few minutes" if args.size in TRAINED_SIZES else "") + "...")
    out_dir = make_model(args.out_dir, size=args.size, seed=args.seed)
    print(f"wrote {out_dir} ({count_params(args.size) / 1e6:.1f}M parameters) in {time.monotonic() - started:.1f} s")
    return 0
