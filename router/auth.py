"""The front door's API key: gRPC metadata and HTTP headers carry `authorization: Bearer KEY`.

Checks a caller's credentials and names the caller (for per-client limits); owns no limit itself
(router/limits.py) and never sees worker-to-worker traffic (transfers carry one-time tokens).
"""

from __future__ import annotations

import hashlib
import hmac

BEARER = "bearer "
# Methods any caller may use: probes and schema discovery. Worker registration stays open until
# workers send the key (see docs/failure_behaviour.md, "Front door").
OPEN_GRPC_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.", "/pdserve.v1.Router/RegisterWorker")
OPEN_HTTP_PATHS = ("/health", "/metrics")


class Unauthenticated(Exception):
    """Missing or wrong API key (gRPC UNAUTHENTICATED, HTTP 401)."""


class ApiKeyAuth:
    def __init__(self, api_key: str) -> None:
        self._key = api_key.encode()

    @property
    def enabled(self) -> bool:
        return bool(self._key)

    def check(self, authorization: str | None) -> None:
        """Raise Unauthenticated unless `authorization` is `Bearer <the key>` (a no-op without a key)."""
        if not self._key:
            return
        if not authorization:
            raise Unauthenticated("missing API key: send the header `authorization: Bearer <key>`")
        if not authorization.lower().startswith(BEARER):
            raise Unauthenticated("the authorization header must be `Bearer <key>`")
        given = authorization[len(BEARER):].strip().encode(errors="replace")
        if not hmac.compare_digest(given, self._key):
            raise Unauthenticated("invalid API key")

    def client_key(self, authorization: str | None, peer_host: str) -> str:
        """Who a request counts against: its checked API key (hashed, never kept in clear) when keys
        are required, else its host (an unchecked header must not let a caller pick a fresh bucket)."""
        if self._key and authorization and authorization.lower().startswith(BEARER):
            digest = hashlib.sha256(authorization[len(BEARER):].strip().encode(errors="replace")).hexdigest()
            return f"key:{digest[:16]}"
        return f"host:{peer_host}"


def grpc_peer_host(peer: str) -> str:
    """The host of a gRPC peer string: 'ipv4:127.0.0.1:5555' -> '127.0.0.1', 'ipv6:[::1]:5555' -> '::1'."""
    _, _, rest = peer.partition(":")
    host = rest.rpartition(":")[0] or rest
    return host.strip("[]") or peer


def metadata_value(metadata, name: str) -> str | None:
    """The first value of `name` in gRPC invocation metadata (keys are lower case on the wire)."""
    for key, value in metadata or ():
        if key == name:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None
