"""EngineConfig: every setting of the model runtime shared by prefill, decode and colocated workers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class EngineConfig:
    model: str  # Hugging Face model directory
    block_size: int = 16  # tokens per KV block
    kv_cache_memory_mb: int = 512  # KV pool size when num_kv_blocks is not given
    num_kv_blocks: int | None = None  # overrides kv_cache_memory_mb
    max_num_seqs: int = 64  # running batch size cap
    max_num_batched_tokens: int = 512  # per-step token budget (prefill chunk size)
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    num_threads: int = 1  # torch intra-op threads
    seed: int = 0  # for requests without their own seed
    dtype: str = "float32"
    device: str = "cpu"

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
        if self.num_threads < 1:
            raise ValueError("num_threads must be >= 1")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
