"""`pdserve healthcheck ADDRESS`: one grpc.health.v1 Check; exits 0 when SERVING, 1 otherwise.

The probe behind the Docker HEALTHCHECK and the compose health checks (Kubernetes uses its native
`grpc:` probe instead). Uses the synchronous gRPC API: it runs once and exits.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="ADDRESS", help="host:port of any pdserve gRPC server")
    parser.add_argument("--service", default="", help="health service name (default: '', the whole server)")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="deadline of the check in seconds (default: 3)")


def check(address: str, service: str = "", timeout_s: float = 3.0) -> tuple[bool, str]:
    """(serving?, what was seen) for one health check against `address`."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                        timeout=timeout_s)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return resp.status == health_pb2.HealthCheckResponse.SERVING, status


def run(args: argparse.Namespace) -> int:
    serving, seen = check(args.address, args.service, args.timeout_s)
    print(f"{args.address}: {seen}", file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1
