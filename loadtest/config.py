"""`BenchConfig`: every setting of one benchmark run, with its defaults and checks.

The `pdserve bench` flags derive from these fields (field `num_prompts` -> `--num-prompts`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .backends import BACKENDS

DATASET_NAMES = ("random", "shared-prefix", "mooncake")
ARRIVAL_NAMES = ("poisson", "gamma", "constant", "trace")
PROMPT_FORMATS = ("auto", "tokens", "text")

# loadtest/ sits at the repository root; the shared data folder is its sibling.
DEFAULT_TRACE_PATH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mooncake" / "conversation_trace.jsonl"


@dataclass
class BenchConfig:
    # target
    base_url: str = "http://127.0.0.1:8000"
    backend: str = "openai-completions"
    model: str | None = None  # None: the first id from GET /v1/models
    # bounds: every run stops at whichever comes first
    num_prompts: int = 100
    max_duration_s: float = 120.0  # in-flight requests are cancelled (and counted) at this limit
    request_timeout_s: float = 300.0  # per request, on top of the run's limit
    seed: int = 0
    # arrivals
    request_rate: float = math.inf  # requests/s; inf sends all at once (bounded by max_concurrency)
    arrival: str | None = None  # None: "trace" for mooncake, else "gamma" if burstiness != 1 else "poisson"
    burstiness: float = 1.0  # gamma shape; 1 is Poisson, < 1 burstier, > 1 more regular
    max_concurrency: int | None = None  # at most this many requests in flight
    # dataset
    dataset: str = "random"
    random_input_len: int = 256  # tokens
    random_output_len: int = 64
    random_range_ratio: float = 0.0  # lengths uniform in [len * (1 - r), len * (1 + r)]
    prefix_groups: int = 4  # shared-prefix: groups, each with its own system prompt
    prefix_len: int = 256  # shared-prefix: tokens of each group's system prompt
    suffix_len: int = 64  # shared-prefix: tokens of each request's own question
    trace: str | None = None  # mooncake JSONL; None: the shared copy when it exists
    time_scale: float = 1.0  # trace gaps are multiplied by this (0.1 = ten times faster)
    length_scale: float = 1 / 32  # trace lengths and the 512-token block size are multiplied by this
    max_output_len: int | None = None  # cap on each request's max_tokens (mooncake)
    trace_start_s: float = 0.0  # replay only trace requests in [start, end) seconds of trace time
    trace_end_s: float | None = None
    trace_block_size: int = 512  # tokens per hash id in the trace file
    ideal_lru_blocks: int | None = None  # mooncake: also report the ideal hit ratio of an LRU cache this big
    # prompts and tokens
    prompt_format: str = "auto"  # tokens: `prompt` as a list of ids; text: decoded; auto: tokens if the backend takes them
    tokenizer: str | None = None  # a Hugging Face directory with tokenizer.json
    vocab_size: int = 1000  # random ids are drawn below this when no tokenizer is given
    # sampling sent to the server
    temperature: float = 0.0
    ignore_eos: bool = True  # vLLM/SGLang extension: generate exactly max_tokens
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into every request body
    # SLOs for goodput (None: not part of the SLO)
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_e2e_ms: float | None = None
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)
    # output
    result_json: str | None = None
    plot_dir: str | None = None
    save_output_text: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {tuple(BACKENDS)}, got {self.backend!r}")
        if self.dataset not in DATASET_NAMES:
            raise ValueError(f"dataset must be one of {DATASET_NAMES}, got {self.dataset!r}")
        if "://" not in self.base_url:
            raise ValueError(f"base_url needs a scheme (http://host:port), got {self.base_url!r}")
        self.base_url = self.base_url.rstrip("/")
        _positive("num_prompts", self.num_prompts)
        _positive("max_duration_s", self.max_duration_s)
        _positive("request_timeout_s", self.request_timeout_s)
        _positive("request_rate", self.request_rate)
        _positive("burstiness", self.burstiness)
        if self.max_concurrency is not None:
            _positive("max_concurrency", self.max_concurrency)
        for name in ("random_input_len", "random_output_len", "prefix_groups", "prefix_len",
                     "suffix_len", "trace_block_size"):
            _positive(name, getattr(self, name))
        if not 0.0 <= self.random_range_ratio < 1.0:
            raise ValueError(f"random_range_ratio must be in [0, 1), got {self.random_range_ratio}")
        _positive("time_scale", self.time_scale)
        _positive("length_scale", self.length_scale)
        scaled_block = self.trace_block_size * self.length_scale
        if abs(scaled_block - round(scaled_block)) > 1e-9 or round(scaled_block) < 1:
            raise ValueError(f"trace_block_size * length_scale must be a whole number of tokens >= 1, "
                             f"got {self.trace_block_size} * {self.length_scale} = {scaled_block}")
        if self.max_output_len is not None:
            _positive("max_output_len", self.max_output_len)
        if self.ideal_lru_blocks is not None:
            _positive("ideal_lru_blocks", self.ideal_lru_blocks)
            if self.dataset != "mooncake":
                raise ValueError("ideal_lru_blocks needs dataset mooncake (the ideal comes from the trace)")
        if self.trace_start_s < 0 or (self.trace_end_s is not None and self.trace_end_s <= self.trace_start_s):
            raise ValueError(f"need 0 <= trace_start_s < trace_end_s, got {self.trace_start_s}, {self.trace_end_s}")
        if self.vocab_size < 100:
            raise ValueError(f"vocab_size must be >= 100, got {self.vocab_size}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        for name in ("slo_ttft_ms", "slo_tpot_ms", "slo_e2e_ms"):
            value = getattr(self, name)
            if value is not None:
                _positive(name, value)
        self.percentiles = tuple(float(p) for p in self.percentiles)
        if not self.percentiles or any(not 0 <= p <= 100 for p in self.percentiles):
            raise ValueError(f"percentiles must be in [0, 100], got {self.percentiles}")

        if self.dataset == "mooncake":
            if self.trace is None:
                if not DEFAULT_TRACE_PATH.exists():
                    raise ValueError("dataset mooncake needs trace=PATH (no shared trace found at "
                                     f"{DEFAULT_TRACE_PATH})")
                self.trace = str(DEFAULT_TRACE_PATH.resolve())
            elif not Path(self.trace).is_file():
                raise ValueError(f"trace file not found: {self.trace}")
        if self.arrival is None:
            if self.dataset == "mooncake":
                self.arrival = "trace"
            else:
                self.arrival = "poisson" if self.burstiness == 1.0 else "gamma"
        if self.arrival not in ARRIVAL_NAMES:
            raise ValueError(f"arrival must be one of {ARRIVAL_NAMES}, got {self.arrival!r}")
        if self.arrival == "trace" and self.dataset != "mooncake":
            raise ValueError("arrival 'trace' needs dataset 'mooncake'")
        if self.arrival == "trace" and math.isfinite(self.request_rate) and self.time_scale != 1.0:
            raise ValueError("trace arrivals take time_scale or a finite request_rate (which rescales the "
                             "trace to that mean rate), not both")
        if self.arrival == "constant" and math.isinf(self.request_rate):
            raise ValueError("arrival 'constant' needs a finite request_rate")

        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")
        if self.prompt_format == "auto":
            self.prompt_format = "tokens" if BACKENDS[self.backend].accepts_token_ids else "text"
        if self.prompt_format == "tokens" and not BACKENDS[self.backend].accepts_token_ids:
            raise ValueError(f"backend {self.backend} takes text prompts only (prompt_format text)")
        if self.tokenizer is not None and not (Path(self.tokenizer) / "tokenizer.json").is_file():
            raise ValueError(f"no tokenizer.json in {self.tokenizer}")

    @property
    def scaled_block_size(self) -> int:
        """Tokens per trace hash id after length scaling (512 * 1/32 = 16)."""
        return round(self.trace_block_size * self.length_scale)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["request_rate"] = None if math.isinf(self.request_rate) else self.request_rate  # JSON has no inf
        return d


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
