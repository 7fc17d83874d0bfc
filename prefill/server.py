"""`pdserve prefill`: a prefill worker process.

Computes prompts (chunked), pushes each layer's KV to the chosen decode worker (pdserve.transfer) as soon
as it exists, and returns the first token to the router.
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


def add_prefill_service(runtime, server) -> str:
    """The PrefillWorker service on `server` (a prefill worker's, or a switchable worker's beside decode's)."""
    import asyncio

    from pdserve.prefill.kv_sender import KVSender
    from pdserve.prefill.lease import LeaseKeeper
    from pdserve.prefill.servicer import PrefillServicer
    from pdserve.prefill.store_prefix import StorePrefix
    from pdserve.proto import pdserve_pb2_grpc as pb_grpc

    assert runtime.engine is not None and runtime.connector is not None
    c = runtime.config
    llm = runtime.engine.engine
    sender = KVSender(runtime.connector, llm.kv_cache, asyncio.get_running_loop(), c.transfer_timeout_s,
                      granularity=c.kv_push)
    llm.layer_hook = sender.on_layer
    store_prefix = StorePrefix(runtime.engine, runtime.store, publish=c.store_publish)
    leases = LeaseKeeper(c.router_tls_ca_file)
    pb_grpc.add_PrefillWorkerServicer_to_server(PrefillServicer(runtime, sender, store_prefix, leases), server)
    return "pdserve.v1.PrefillWorker"


async def serve(worker_config: WorkerConfig, engine_config: EngineConfig,
                transfer_config: TransferConfig | None = None, etcd_config: EtcdConfig | None = None) -> None:
    from pdserve.proto import pdserve_pb2 as pb
    from pdserve.worker_roles import serve as serve_worker

    await serve_worker(pb.PREFILL, worker_config, engine_config, transfer_config, etcd_config)


def run(args: argparse.Namespace) -> int:
    import asyncio

    asyncio.run(serve(config_from_args(WorkerConfig, args), config_from_args(EngineConfig, args),
                      config_from_args(TransferConfig, args), config_from_args(EtcdConfig, args)))
    return 0
