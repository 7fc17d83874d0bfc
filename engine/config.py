"""EngineConfig: every setting of the model runtime shared by prefill, decode and colocated workers."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    max_num_batched_tokens: int = field(default=512, metadata=_h("per-step token budget (the prefill chunk size)"))
    enable_chunked_prefill: bool = field(default=True, metadata=_h("split long prompts into chunks mixed with decodes"))
    enable_prefix_caching: bool = field(default=True, metadata=_h("reuse the KV of identical prompt prefixes"))
    max_model_len: int | None = field(default=None, metadata=_h("maximum context length (default: the model's)"))
    num_threads: int | None = field(default=None, metadata=_h(
        "torch intra-op threads for the forward pass; unset: the cores this process may use (CPU affinity "
        "and cgroup quota); `pdserve up` gives each worker its share"))
    seed: int = field(default=0, metadata=_h("sampling seed for requests without their own"))
    dtype: str = field(default="float32", metadata=_h("weights and KV dtype", choices=["float32", "bfloat16", "float16"]))
    device: str = field(default="cpu", metadata=_h("torch device (cpu or cuda)"))
    attention_backend: str = field(default="auto", metadata=_h(
        "attention over the paged cache: paged-cpu (C++/OpenMP kernel, all sequences in one call), reference "
        "(plain torch gather + SDPA), or auto (the kernel on the CPU when it builds, else the reference)",
        choices=["auto", "paged-cpu", "reference"]))
    linear_backend: str = field(default="auto", metadata=_h(
        "linear layers: onednn (weights packed once for oneDNN), torch (F.linear), or auto (onednn on the CPU "
        "when available)", choices=["auto", "onednn", "torch"]))

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
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("num_threads must be >= 1")
        if self.attention_backend not in ("auto", "paged-cpu", "reference"):
            raise ValueError(f"attention_backend must be auto, paged-cpu or reference, got {self.attention_backend!r}")
        if self.linear_backend not in ("auto", "onednn", "torch"):
            raise ValueError(f"linear_backend must be auto, onednn or torch, got {self.linear_backend!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
