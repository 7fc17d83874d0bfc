"""RouterConfig: every setting of the router (front door, worker choice, timeouts)."""

from __future__ import annotations

from dataclasses import dataclass, field


def _h(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass(slots=True)
class RouterConfig:
    model: str = field(default="", metadata=_h("model directory (tokenizer, config); empty: the built-in tiny model",
                                               metavar="DIR"))
    served_model_name: str = field(default="", metadata=_h("model name clients use (default: the directory name)"))
    host: str = field(default="127.0.0.1", metadata=_h("address the router binds to"))
    port: int = field(default=50051, metadata=_h("gRPC port (0: pick a free one)"))
    http_port: int = field(default=8000, metadata=_h(
        "OpenAI-compatible HTTP API and /metrics port (0: pick a free one; -1: no HTTP listener)"))
    prefill_workers: str = field(default="", metadata=_h("static prefill worker addresses, comma-separated"))
    decode_workers: str = field(default="", metadata=_h("static decode worker addresses, comma-separated"))
    colocated_workers: str = field(default="", metadata=_h("static colocated worker addresses, comma-separated"))
    local_prefill_threshold: int = field(default=256, metadata=_h(
        "prompts shorter than this many tokens are prefilled on the decode worker (conditional "
        "disaggregation; below ~256 tokens the extra hops cost more than they save on a CPU host; 0: never, "
        "not even to overflow a saturated prefill pool)"))
    local_prefill_max_inflight: int = field(default=4, metadata=_h(
        "... but only while the decode worker has fewer requests in flight than this: a local prefill "
        "stalls every running sequence's next token, so a busy decode worker sends even short prompts "
        "to a prefill worker (0: never prefill on decode when a prefill worker is up)"))
    remote_prefill_max_queue_tokens: int = field(default=1024, metadata=_h(
        "... unless the best prefill worker already has more than this many prompt tokens queued: when "
        "both sides are busy, a short prompt stays on decode rather than wait in the prefill queue; past it a "
        "prompt of any length overflows to its decode worker while decode's own local-prefill queue is shorter, "
        "so a saturated prefill pool shares prefill and TTFT stays bounded (0: no limit, no overflow)"))
    request_timeout_s: float = field(default=600.0, metadata=_h("deadline of a request without its own"))
    hop_timeout_s: float = field(default=60.0, metadata=_h("bound on each Reserve / Prefill call"))
    health_interval_s: float = field(default=0.5, metadata=_h("how often each worker's Stats are polled"))
    unhealthy_after: int = field(default=3, metadata=_h("failed polls before a worker is taken out of rotation"))
    forget_after_s: float = field(default=30.0, metadata=_h("a registered worker silent this long is forgotten"))
    block_size: int = field(default=16, metadata=_h("KV block size of the workers (for block hashes)"))
    max_retries: int = field(default=2, metadata=_h(
        "retries of a request after a worker fails (another prefill, or decode continued elsewhere)"))
    retry_backoff_s: float = field(default=0.05, metadata=_h("first retry delay; doubles per retry"))
    max_inflight_requests: int = field(default=512, metadata=_h(
        "requests in flight beyond this are rejected with RESOURCE_EXHAUSTED / 429"))
    kvstore_master: str = field(default="", metadata=_h(
        "KV cache store master host:port (or a comma-separated list of masters), asked how much of a prompt "
        "it holds (KV-aware routing)"))
    prefix_index_blocks: int = field(default=65536, metadata=_h(
        "blocks remembered per prefill worker in the router's approximate prefix index (at most the "
        "worker's own KV blocks, as its stats report)"))
    store_load_cost: float = field(default=0.1, metadata=_h(
        "cost of loading one token's KV from the store, relative to computing it (routing cost model)"))
    ttft_slo_ms: float = field(default=0.0, metadata=_h(
        "reject early when the predicted time to first token exceeds this (0: off)"))
    api_key: str = field(default="", repr=False, metadata=_h(
        "require `authorization: Bearer KEY` on gRPC calls and HTTP /v1 requests (empty: no key)"))
    max_prompt_tokens: int = field(default=0, metadata=_h("longest prompt accepted, in tokens (0: the model's context)"))
    max_tokens_limit: int = field(default=0, metadata=_h("largest max_tokens accepted (0: the rest of the context)"))
    default_max_tokens: int = field(default=4096, metadata=_h(
        "max_tokens of an HTTP request that sets none: min(this, the rest of the context); 0: the rest of the "
        "context, as vLLM (decode reserves only prompt + headroom either way and grows as it generates)"))
    max_request_bytes: int = field(default=64 * 2**20, metadata=_h(
        "largest HTTP body / gRPC request message accepted, in bytes (64 MiB)"))
    max_streams_per_client: int = field(default=0, metadata=_h(
        "concurrent requests per client (its API key, else its IP address) beyond this get 429 (0: no limit)"))
    tls_cert_file: str = field(default="", metadata=_h("PEM certificate of the gRPC listener (with --tls-key-file: TLS)",
                                                       metavar="FILE"))
    tls_key_file: str = field(default="", metadata=_h("PEM private key of the gRPC listener", metavar="FILE"))
    worker_tls_ca_file: str = field(default="", metadata=_h(
        "PEM CA certificate to verify workers' gRPC TLS (workers run with --tls-cert-file); empty: plaintext",
        metavar="FILE"))
    trace_requests: int = field(default=0, metadata=_h(
        "keep the hop timelines of the last N requests at GET /debug/requests and log one line per request "
        "with where its time went (0: off)"))
    otlp_endpoint: str = field(default="", metadata=_h(
        "with --trace-requests: also export each request as OpenTelemetry spans to this OTLP gRPC endpoint "
        "(host:port; needs opentelemetry-sdk and opentelemetry-exporter-otlp-proto-grpc)"))

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError("port must be in [0, 65535]")
        if not -1 <= self.http_port < 65536:
            raise ValueError("http_port must be -1 (off) or in [0, 65535]")
        if min(self.local_prefill_threshold, self.local_prefill_max_inflight, self.remote_prefill_max_queue_tokens) < 0:
            raise ValueError("local_prefill_threshold, local_prefill_max_inflight and "
                             "remote_prefill_max_queue_tokens must be >= 0")
        if self.request_timeout_s <= 0 or self.hop_timeout_s <= 0 or self.health_interval_s <= 0:
            raise ValueError("timeouts and intervals must be > 0")
        if self.unhealthy_after < 1:
            raise ValueError("unhealthy_after must be >= 1")
        if min(self.max_prompt_tokens, self.max_tokens_limit, self.max_streams_per_client,
               self.default_max_tokens) < 0:
            raise ValueError("max_prompt_tokens, max_tokens_limit, default_max_tokens and max_streams_per_client "
                             "must be >= 0")
        if self.max_request_bytes < 1024:
            raise ValueError("max_request_bytes must be >= 1024")
        if self.trace_requests < 0:
            raise ValueError("trace_requests must be >= 0")
        if self.otlp_endpoint and not self.trace_requests:
            raise ValueError("otlp_endpoint needs trace_requests > 0 (tracing is off)")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("give both tls_cert_file and tls_key_file, or neither")

    @staticmethod
    def split(addresses: str) -> list[str]:
        return [a.strip() for a in addresses.split(",") if a.strip()]
