"""Typed errors raised anywhere in pdserve, and the one table that maps them to gRPC and HTTP.

Code raises these inside; only the edges (router servicers, HTTP handlers, worker servicers)
translate them, through `grpc_status_of` / `http_status_of`.
"""

from __future__ import annotations

import grpc


class PdserveError(Exception):
    """Base of every error pdserve raises on purpose."""


class InvalidRequest(PdserveError):
    """The request (prompt, sampling values, sizes) is wrong; the message says what to fix."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param  # the request field at fault, when one is (OpenAI's error `param`)


class InvalidModel(PdserveError):
    """A checkpoint directory is missing files, malformed, or uses an unsupported feature."""


class Overloaded(PdserveError):
    """No capacity now (KV blocks, queue slots); the caller should retry later."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PeerUnavailable(PdserveError):
    """A worker or store node needed for this request is dead, unreachable or unregistered."""


class KVTransferError(PdserveError):
    """A KV transfer failed (rejected token, wrong size, connection lost)."""


class KVTransferTimeout(KVTransferError):
    """A KV transfer did not complete within its deadline."""


class RequestAborted(PdserveError):
    """The request was aborted (client cancel, explicit Abort, deadline)."""


class DeadlineExceeded(PdserveError):
    """The request's deadline passed before it finished."""


class NotFound(PdserveError):
    """An id (request, reservation, model) that the callee does not know."""


# error type -> (gRPC status, HTTP status); the first matching base class wins.
_STATUS_TABLE: list[tuple[type[BaseException], grpc.StatusCode, int]] = [
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT, 400),
    (InvalidModel, grpc.StatusCode.INVALID_ARGUMENT, 400),
    (NotFound, grpc.StatusCode.NOT_FOUND, 404),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (KVTransferTimeout, grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (PeerUnavailable, grpc.StatusCode.UNAVAILABLE, 503),
    (KVTransferError, grpc.StatusCode.UNAVAILABLE, 503),
    (RequestAborted, grpc.StatusCode.CANCELLED, 499),
]


def grpc_status_of(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code an error maps to (INTERNAL for anything unexpected)."""
    for exc_type, code, _ in _STATUS_TABLE:
        if isinstance(exc, exc_type):
            return code
    return grpc.StatusCode.INTERNAL


def http_status_of(exc: BaseException) -> int:
    """The HTTP status an error maps to (500 for anything unexpected)."""
    for exc_type, _, http in _STATUS_TABLE:
        if isinstance(exc, exc_type):
            return http
    return 500


def error_from_grpc(code: grpc.StatusCode, message: str) -> PdserveError:
    """The typed error for a gRPC status received from a peer (the inverse of the table)."""
    for exc_type, c, _ in _STATUS_TABLE:
        if c == code:
            return exc_type(message)
    return PeerUnavailable(f"{code.name}: {message}")
