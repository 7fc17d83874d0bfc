"""What one benchmark request is (`BenchRequest`) and what came back (`RequestResult`).

Times in a `RequestResult` are `time.perf_counter()` seconds as the backend saw them; the
runner turns them into offsets from the benchmark's start when it writes records.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class BenchRequest:
    request_id: str
    prompt: list[int] | str  # token ids (prompt_format "tokens") or text
    prompt_len: int  # tokens the dataset meant to send (re-tokenised text may differ)
    max_tokens: int
    arrival_offset_s: float | None = None  # from a trace; None when arrivals are generated
    hash_ids: tuple[int, ...] | None = None  # mooncake: the trace's block hash ids, for the ideal hit ratio


@dataclass(slots=True)
class RequestResult:
    request_id: str
    success: bool = False
    error_kind: str | None = None  # "http_503", an exception class name, "cancelled", ...
    error: str | None = None
    prompt_len: int = 0
    output_len: int = 0
    output_text: str = ""
    start_time: float = 0.0  # perf_counter when the request was handed to the backend
    end_time: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # perf_counter of each streamed chunk with content
    usage_prompt_tokens: int | None = None  # from the server's `usage`, when it sends one
    usage_completion_tokens: int | None = None
    usage_cached_tokens: int | None = None  # prompt tokens the server took from a cache (usage details)
    phase_s: dict[str, float] | None = None  # the server's timing of this request: phase -> seconds (pdserve)
    prefilled_remotely: bool | None = None  # pdserve gRPC: prompt computed on a prefill worker (not its decode one)
    kv_bytes_moved: int | None = None  # pdserve gRPC: KV bytes pushed from prefill to decode for it

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times[0] - self.start_time if self.chunk_times else None

    @property
    def e2e_s(self) -> float | None:
        return self.end_time - self.start_time if self.end_time else None

    @property
    def itl_s(self) -> list[float]:
        times = self.chunk_times
        return [b - a for a, b in zip(times, times[1:])]

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None for outputs of one token."""
        ttft, e2e = self.ttft_s, self.e2e_s
        if ttft is None or e2e is None or self.output_len < 2:
            return None
        return (e2e - ttft) / (self.output_len - 1)
