"""`pdserve decode` (and `pdserve worker`, the colocated role): a decode worker process.

Serves the DecodeWorker gRPC service, receives prompt KV from prefill workers (pdserve.transfer) into
reserved blocks, runs the continuous-batching decode loop and streams tokens to the router.
"""

from __future__ import annotations

import argparse

from pdserve.engine.config import EngineConfig
from pdserve.membership import EtcdConfig
from pdserve.settings import add_config_arguments, config_from_args
from pdserve.transfer.config import TransferConfig
from pdserve.worker_config import WorkerConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, WorkerConfig, title="worker")
    add_config_arguments(parser, EngineConfig, title="engine")
    add_config_arguments(parser, TransferConfig, title="transfer")
    add_config_arguments(parser, EtcdConfig, title="etcd")


def add_decode_service(runtime, server):
    """The DecodeWorker service on `server`; returns its name and its ReservationTable (released at stop)."""
    from pdserve.decode.reservations import ReservationTable
    from pdserve.decode.servicer import DecodeServicer
    from pdserve.engine.connector import WorkerConnector
    from pdserve.proto import pdserve_pb2_grpc as pb_grpc

    assert runtime.engine is not None
    c = runtime.config
    # a fixed colocated worker has no transport; it never reserves (its Reserve calls fail at expect_load)
    connector = runtime.connector or WorkerConnector(None, runtime.engine.engine.kv_cache.layout())
    table = ReservationTable(runtime.engine, connector, c.reservation_timeout_s, max_s=c.reservation_max_s,
                             headroom_tokens=c.reserve_headroom_tokens)
    pb_grpc.add_DecodeWorkerServicer_to_server(DecodeServicer(runtime, table), server)
    return "pdserve.v1.DecodeWorker", table


async def serve(worker_config: WorkerConfig, engine_config: EngineConfig, colocated: bool = False,
                transfer_config: TransferConfig | None = None, etcd_config: EtcdConfig | None = None) -> None:
    from pdserve.proto import pdserve_pb2 as pb
    from pdserve.worker_roles import serve as serve_worker

    await serve_worker(pb.COLOCATED if colocated else pb.DECODE, worker_config, engine_config, transfer_config,
                       etcd_config)


def run(args: argparse.Namespace) -> int:
    import asyncio

    asyncio.run(serve(config_from_args(WorkerConfig, args), config_from_args(EngineConfig, args),
                      colocated=getattr(args, "colocated", False), transfer_config=config_from_args(TransferConfig, args),
                      etcd_config=config_from_args(EtcdConfig, args)))
    return 0
