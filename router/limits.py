"""Front-door limits: prompt length, max_tokens and request size of one request, and how many
requests one client may have in flight. Admission by cluster load is the dispatcher's
(`--max-inflight-requests`, `--ttft-slo-ms`); this module only bounds what one caller may ask.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pdserve.errors import InvalidRequest, Overloaded
from pdserve.router.config import RouterConfig


class RequestTooLarge(InvalidRequest):
    """A request body / message over `max_request_bytes` (HTTP 413; gRPC RESOURCE_EXHAUSTED, as gRPC's own cap)."""


class FrontDoorLimits:
    def __init__(self, config: RouterConfig) -> None:
        self.max_prompt_tokens = config.max_prompt_tokens
        self.max_tokens_limit = config.max_tokens_limit
        self.default_max_tokens_cap = config.default_max_tokens
        self.max_request_bytes = config.max_request_bytes
        self.max_streams_per_client = config.max_streams_per_client
        self.streams: dict[str, int] = {}  # client key -> requests in flight

    def check_size(self, num_bytes: int) -> None:
        if num_bytes > self.max_request_bytes:
            raise RequestTooLarge(f"the request is {num_bytes} bytes; the limit is {self.max_request_bytes}",
                                  param="body")

    def check_request(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Too long a prompt or too large a max_tokens is a bad request (400), not overload: retrying
        the same request can never succeed, so it must not get a 429 that clients retry."""
        if self.max_prompt_tokens and num_prompt_tokens > self.max_prompt_tokens:
            raise InvalidRequest(f"prompt has {num_prompt_tokens} tokens; this server accepts at most "
                                 f"{self.max_prompt_tokens}", param="prompt")
        if self.max_tokens_limit and max_tokens > self.max_tokens_limit:
            raise InvalidRequest(f"max_tokens is {max_tokens}; this server accepts at most {self.max_tokens_limit}",
                                 param="max_tokens")

    def default_max_tokens(self, rest_of_context: int) -> int:
        """max_tokens for a request that sets none: the rest of the context, capped by the configured default
        and by the largest max_tokens accepted."""
        return min([rest_of_context] + [c for c in (self.default_max_tokens_cap, self.max_tokens_limit) if c])

    @contextmanager
    def stream(self, client_key: str) -> Iterator[None]:
        """Count one request of `client_key` while the block runs; Overloaded (429) past the limit."""
        limit = self.max_streams_per_client
        if limit and self.streams.get(client_key, 0) >= limit:
            raise Overloaded(f"this client already has {limit} requests in flight (the per-client limit); "
                             "retry when one finishes", retry_after_s=1.0)
        self.streams[client_key] = self.streams.get(client_key, 0) + 1
        try:
            yield
        finally:
            left = self.streams[client_key] - 1
            if left:
                self.streams[client_key] = left
            else:
                del self.streams[client_key]
