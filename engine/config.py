"""EngineConfig: every setting of the model runtime shared by prefill, decode and colocated workers."""

from __future__ import annotations

from dataclasses import dataclass, field


MAX_SPECULATIVE_TOKENS = 16


def _h(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass(slots=True)
class EngineConfig:
    model: str = field(default="", metadata=_h("Hugging Face model directory (config.json, *.safetensors, "
                                               "tokenizer.json); empty: the built-in tiny model", metavar="DIR"))
    block_size: int = field(default=16, metadata=_h("tokens per KV block"))
    kv_cache_memory_mb: int = field(default=512, metadata=_h("KV pool size in MiB (when --num-kv-blocks is unset)"))
    num_kv_blocks: int | None = field(default=None, metadata=_h("KV pool size in blocks (overrides the MiB size)"))
    max_num_seqs: int = field(default=64, metadata=_h("maximum sequences in the running batch"))
    max_num_batched_tokens: int = field(default=2048, metadata=_h(
        "per-step token budget: decodes, speculative proposals and prompt chunks together (vLLM's CPU server "
        "default); while sequences decode, --prefill-chunk-ms bounds the prompt part"))
    prefill_chunk_ms: float = field(default=100.0, metadata=_h(
        "while sequences are decoding, a step's prompt tokens are cut to what this worker computes in this "
        "many milliseconds (its own measured prefill speed), never below --min-prefill-chunk, so running "
        "decodes do not wait behind long prefill steps; 0: no time bound (the whole budget)"))
    min_prefill_chunk: int = field(default=512, metadata=_h(
        "prompt tokens a step may always compute next to running decodes, however slow the model"))
    enable_chunked_prefill: bool = field(default=True, metadata=_h("split long prompts into chunks mixed with decodes"))
    enable_prefix_caching: bool = field(default=True, metadata=_h("reuse the KV of identical prompt prefixes"))
    max_model_len: int | None = field(default=None, metadata=_h("maximum context length (default: the model's)"))
    num_threads: int | None = field(default=None, metadata=_h(
        "torch intra-op threads for the forward pass; unset: the cores this process may use (CPU affinity "
        "and cgroup quota); `pdserve up` gives each worker its share"))
    elastic_threads: bool = field(default=False, metadata=_h(
        "grow the forward pass's threads from --num-threads up to all the cores this process may use while other "
        "processes leave them idle, and give them back when those processes want them (measured from /proc/stat "
        "every 100 ms); `pdserve up` turns it on when it splits the cores among several workers"))
    step_threads: bool = field(default=True, metadata=_h(
        "run each kind of step (prefill or decode, by row count) on one thread or on all the forward pass's "
        "threads, whichever its measured step times say is faster (the two take turns for a few steps, then the "
        "faster is kept for 256 steps of that kind); off: always all"))
    seed: int = field(default=0, metadata=_h("sampling seed for requests without their own"))
    dtype: str = field(default="float32", metadata=_h("weights and KV dtype", choices=["float32", "bfloat16", "float16"]))
    device: str = field(default="cpu", metadata=_h("torch device (cpu or cuda)"))
    attention_backend: str = field(default="auto", metadata=_h(
        "attention over the paged cache: paged-cpu (C++/OpenMP kernel, all sequences in one call, with the fused "
        "norm/RoPE/SiLU kernels), reference (plain torch gather + SDPA and torch ops), or auto (the kernels on the "
        "CPU when they build, else the reference)",
        choices=["auto", "paged-cpu", "reference"]))
    linear_backend: str = field(default="auto", metadata=_h(
        "linear layers: onednn (weights packed once for oneDNN), torch (F.linear), or auto (onednn on the CPU "
        "when available)", choices=["auto", "onednn", "torch"]))
    speculative: str = field(default="off", metadata=_h(
        "speculative decoding on decoding sequences: ngram (prompt lookup: propose the tokens that followed the "
        "latest earlier occurrence of the last n tokens), draft (a smaller model with the same tokenizer, "
        "--draft-model), or off", choices=["off", "ngram", "draft"]))
    num_speculative_tokens: int = field(default=4, metadata=_h(
        f"tokens proposed per sequence and step, verified in one forward pass (1 to {MAX_SPECULATIVE_TOKENS})"))
    draft_model: str = field(default="", metadata=_h(
        "with --speculative draft: the draft's Hugging Face directory (same tokenizer and vocabulary as the "
        "model); empty: the built-in draft of a built-in model (`pdserve make-model --size small-draft`)",
        metavar="DIR"))
    speculative_ngram_min: int = field(default=2, metadata=_h("ngram: shortest suffix looked up"))
    speculative_ngram_max: int = field(default=4, metadata=_h("ngram: longest suffix looked up (tried first)"))
    speculative_min_acceptance: float = field(default=0.3, metadata=_h(
        "a sequence whose recent accepted / proposed ratio falls below this decodes without speculation for a "
        "while (doubling pauses up to 64 steps between probes), so workloads where proposals miss stay near "
        "plain-decode speed"))
    speculative_cost_control: bool = field(default=True, metadata=_h(
        "choose each step's number of speculative tokens (none, 1, 2, 4 ... --num-speculative-tokens) by the "
        "tokens per second this engine measured for each choice at the same batch size, so speculation is "
        "skipped where verifying the extra rows costs more than it gains (larger batches); off: always propose "
        "up to --num-speculative-tokens"))

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_memory_mb < 1:
            raise ValueError("kv_cache_memory_mb must be >= 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.prefill_chunk_ms < 0:
            raise ValueError(f"prefill_chunk_ms must be >= 0, got {self.prefill_chunk_ms}")
        if self.min_prefill_chunk < 1:
            raise ValueError(f"min_prefill_chunk must be >= 1, got {self.min_prefill_chunk}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("num_threads must be >= 1")
        if self.attention_backend not in ("auto", "paged-cpu", "reference"):
            raise ValueError(f"attention_backend must be auto, paged-cpu or reference, got {self.attention_backend!r}")
        if self.linear_backend not in ("auto", "onednn", "torch"):
            raise ValueError(f"linear_backend must be auto, onednn or torch, got {self.linear_backend!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.speculative not in ("off", "ngram", "draft"):
            raise ValueError(f"speculative must be off, ngram or draft, got {self.speculative!r}")
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], "
                             f"got {self.num_speculative_tokens}")
        if not 1 <= self.speculative_ngram_min <= self.speculative_ngram_max:
            raise ValueError("speculative n-gram sizes need 1 <= --speculative-ngram-min <= --speculative-ngram-max, "
                             f"got {self.speculative_ngram_min} and {self.speculative_ngram_max}")
        if not 0.0 <= self.speculative_min_acceptance <= 1.0:
            raise ValueError(f"speculative_min_acceptance must be in [0, 1], got {self.speculative_min_acceptance}")
        if self.draft_model and self.speculative != "draft":
            raise ValueError("--draft-model is used only with --speculative draft")
