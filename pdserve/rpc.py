"""gRPC plumbing shared by every pdserve server and client: servers with the standard health
and reflection services, channels with sane options, and the one place typed errors become
gRPC statuses (`map_errors` / `map_stream_errors`)."""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.errors import PdserveError, error_from_grpc, grpc_status_of

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 2**20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),
]


def create_server(service_names: list[str], max_receive_bytes: int = MAX_MESSAGE_BYTES
                  ) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """An asyncio gRPC server with grpc.health.v1 (initially NOT_SERVING) and reflection; a request
    message over `max_receive_bytes` is refused by gRPC itself (RESOURCE_EXHAUSTED)."""
    options = [o for o in CHANNEL_OPTIONS if o[0] != "grpc.max_receive_message_length"]
    options.append(("grpc.max_receive_message_length", min(max_receive_bytes, MAX_MESSAGE_BYTES)))
    server = grpc.aio.server(options=options)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return server, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, service_names: list[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        await health_servicer.set(name, status)


def bind(server: grpc.aio.Server, host: str, port: int, tls_cert_file: str = "", tls_key_file: str = "") -> int:
    """Bind a port (TLS when given a PEM certificate and key, else insecure); returns the port
    actually bound (port 0 = pick one)."""
    if tls_cert_file:
        creds = grpc.ssl_server_credentials([(Path(tls_key_file).read_bytes(), Path(tls_cert_file).read_bytes())])
        bound = server.add_secure_port(f"{host}:{port}", creds)
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {host}:{port}")
    return bound


def target(address: str) -> str:
    """The gRPC target of `address`: one `host:port`, or a comma-separated list of them (router
    replicas, store masters) that the channel fails over between (gRPC's pick_first: the first
    address that accepts; when it goes away, the next). Names in a list are resolved here (IPv4)."""
    addresses = [a.strip() for a in address.split(",") if a.strip()]
    if len(addresses) <= 1:
        return address.strip()
    resolved = []
    for a in addresses:
        host, sep, port = a.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"bad address {a!r} in {address!r}: expected host:port")
        try:
            resolved.append(f"{socket.gethostbyname(host)}:{port}")
        except OSError as exc:
            raise ValueError(f"cannot resolve {host!r} in {address!r}: {exc}") from exc
    return "ipv4:" + ",".join(resolved)


def channel(address: str, tls_ca_file: str = "") -> grpc.aio.Channel:
    """A channel to `address` (one host:port or a failover list, see `target`); TLS, trusting the PEM
    CA certificate `tls_ca_file`, when one is given."""
    if tls_ca_file:
        creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca_file).read_bytes())
        return grpc.aio.secure_channel(target(address), creds, options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(target(address), options=CHANNEL_OPTIONS)


async def is_serving(address: str, timeout_s: float = 1.0, tls_ca_file: str = "") -> bool:
    """True when the server at `address` answers its health check with SERVING."""
    async with channel(address, tls_ca_file) as ch:
        try:
            resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING


def _abort_args(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    return grpc_status_of(exc), str(exc) or type(exc).__name__


def map_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Unary handler edge: typed errors become their gRPC status; others INTERNAL (logged)."""
    @functools.wraps(fn)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await fn(self, request, context)
        except PdserveError as exc:
            await context.abort(*_abort_args(exc))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the edge: report, never crash the server
            logger.exception("%s failed", fn.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    return wrapper


def map_stream_errors(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """Server-streaming handler edge, like `map_errors`."""
    @functools.wraps(fn)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            async for item in fn(self, request, context):
                yield item
        except PdserveError as exc:
            await context.abort(*_abort_args(exc))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            logger.exception("%s failed", fn.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    return wrapper


def typed_error(exc: grpc.aio.AioRpcError, peer: str) -> PdserveError:
    """The typed error for a failed call to a peer."""
    return error_from_grpc(exc.code(), f"{peer}: {exc.details()}")
