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


async def serve(worker_config: WorkerConfig, engine_config: EngineConfig,
                transfer_config: TransferConfig | None = None, etcd_config: EtcdConfig | None = None) -> None:
    import asyncio

    from pdserve.prefill.kv_sender import KVSender
    from pdserve.prefill.lease import LeaseKeeper
    from pdserve.prefill.servicer import PrefillServicer
    from pdserve.prefill.store_prefix import StorePrefix
    from pdserve.proto import pdserve_pb2 as pb
    from pdserve.proto import pdserve_pb2_grpc as pb_grpc
    from pdserve.worker_runtime import WorkerRuntime

    runtime = WorkerRuntime(pb.PREFILL, worker_config, engine_config, transfer_config, etcd_config)
    runtime.install_signal_handlers()

    def add(server) -> list[str]:
        assert runtime.engine is not None
        llm = runtime.engine.engine
        assert runtime.connector is not None
        sender = KVSender(runtime.connector, llm.kv_cache, asyncio.get_running_loop(), worker_config.transfer_timeout_s,
                          granularity=worker_config.kv_push)
        llm.layer_hook = sender.on_layer
        store_prefix = StorePrefix(runtime.engine, runtime.store, publish=worker_config.store_publish)
        leases = LeaseKeeper(worker_config.router_tls_ca_file)
        pb_grpc.add_PrefillWorkerServicer_to_server(PrefillServicer(runtime, sender, store_prefix, leases), server)
        return ["pdserve.v1.PrefillWorker"]

    try:
        await runtime.start(add)
        await runtime.wait()
    finally:
        await runtime.stop()


def run(args: argparse.Namespace) -> int:
    import asyncio

    asyncio.run(serve(config_from_args(WorkerConfig, args), config_from_args(EngineConfig, args),
                      config_from_args(TransferConfig, args), config_from_args(EtcdConfig, args)))
    return 0
