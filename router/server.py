"""`pdserve router`: the front door. Serves the public gRPC API and the OpenAI-compatible HTTP API
(with /metrics) in one process, keeps the worker registry, and drives each request through
decode reserve -> prefill -> decode stream."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from dataclasses import replace
from pathlib import Path

from pdserve.membership import EtcdConfig
from pdserve.planner.config import PlannerConfig
from pdserve.router.config import RouterConfig
from pdserve.settings import add_config_arguments, config_from_args

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, RouterConfig, title="router")
    add_config_arguments(parser, PlannerConfig, title="planner")
    add_config_arguments(parser, EtcdConfig, title="etcd")


class RouterApp:
    """The router's parts, built and torn down together (also used in-process by tests)."""

    def __init__(self, config: RouterConfig, etcd_config: EtcdConfig | None = None,
                 planner_config: PlannerConfig | None = None) -> None:
        self.planner_config = planner_config or PlannerConfig()
        self.planner = None  # planner.Planner with --planner throughput|slo
        self.etcd_config = etcd_config if etcd_config is not None and etcd_config.etcd else None
        self.etcd = None  # membership.Etcd while discovering workers there
        if not config.model:
            from pdserve.engine.builtin_model import ensure_builtin_model

            config = replace(config, model=str(ensure_builtin_model("tiny")))
        self.config = config
        self.server = None
        self.health = None
        self.registry = None
        self.dispatcher = None
        self.metrics = None
        self.http = None
        self.limits = None  # FrontDoorLimits, shared by the gRPC and HTTP front ends
        self.address = ""
        self.http_address = ""

    async def start(self) -> None:
        from pdserve import rpc
        from pdserve.engine.loader import model_fingerprint
        from pdserve.engine.model_config import ModelConfig
        from pdserve.engine.tokenizer import Tokenizer
        from pdserve.proto import pdserve_pb2_grpc as pb_grpc
        from pdserve.router.dispatch import ModelMeta
        from pdserve.router.http_api import HttpApi
        from pdserve.router.auth import ApiKeyAuth
        from pdserve.router.limits import FrontDoorLimits
        from pdserve.router.metrics import MeteredDispatcher, RouterMetrics
        from pdserve.router.registry import WorkerRegistry
        from pdserve.router.servicer import RouterServicer
        from pdserve.router.tracing import RequestTracer

        c = self.config
        model_config = ModelConfig.from_dir(c.model)
        tokenizer = Tokenizer(c.model)
        fingerprint = await asyncio.to_thread(model_fingerprint, c.model)
        eos = model_config.eos_token_ids[0] if model_config.eos_token_ids else tokenizer.eos_token_id
        meta = ModelMeta(name=c.served_model_name or Path(c.model).name, max_model_len=model_config.max_position_embeddings,
                         vocab_size=model_config.vocab_size, block_size=c.block_size, fingerprint=fingerprint, eos_token_id=eos)
        self.registry = WorkerRegistry(c, fingerprint)
        self.registry.add_static()
        self.metrics = RouterMetrics(meta.name)
        tracer = RequestTracer(c.trace_requests, c.otlp_endpoint) if c.trace_requests else None
        self.dispatcher = MeteredDispatcher(c, self.registry, tokenizer, meta, metrics=self.metrics, tracer=tracer)
        self.metrics.watch_workers(self.registry, self.dispatcher)
        if self.planner_config.planner != "off":
            from pdserve.planner.planner import Planner

            self.planner = Planner(self.planner_config, self.registry, self.dispatcher.policy)
            self.dispatcher.finished_listeners.append(self.planner.observe)
            self.dispatcher.arrival_listeners.append(self.planner.observe_arrival)
            self.metrics.watch_planner(self.planner)
        self.server, self.health = rpc.create_server(["pdserve.v1.Router"], max_receive_bytes=c.max_request_bytes)
        self.limits = FrontDoorLimits(c)  # one count of streams per client across gRPC and HTTP
        auth = ApiKeyAuth(c.api_key)
        pb_grpc.add_RouterServicer_to_server(RouterServicer(self.dispatcher, self.registry, self.limits, auth),
                                             self.server)
        port = rpc.bind(self.server, c.host, c.port, c.tls_cert_file, c.tls_key_file)
        await self.server.start()
        self.address = f"{c.host}:{port}"
        if c.http_port >= 0:
            self.http = HttpApi(self.dispatcher, self.registry, self.metrics, self.limits, auth)
            await self.http.start(c.host, c.http_port)
            self.http_address = self.http.address
        self.registry.start()
        if self.planner is not None:
            self.planner.start()
            logger.info("planner on (%s mode): the split follows the load", self.planner_config.planner)
        if self.etcd_config is not None:
            await self._discover()
        await rpc.set_serving(self.health, ["pdserve.v1.Router"], True)
        logger.info("router serving model %r on %s (gRPC)%s", meta.name, self.address,
                    f" and http://{self.http_address} (OpenAI HTTP, /metrics)" if self.http_address else "")

    async def _discover(self) -> None:
        """Learn every worker from etcd: a key put is a registration, a key gone (lease expired, or
        the worker stopped) takes the worker out; a worker back under the same id replaces its record."""
        from pdserve.membership import Etcd
        from pdserve.proto import pdserve_pb2 as pb

        self.etcd = Etcd(self.etcd_config)
        await self.etcd.connect()
        key_to_address: dict[str, str] = {}  # etcd key -> address registered under it

        def on_put(key: str, value: bytes) -> None:
            try:
                info = pb.WorkerInfo.FromString(value)
            except Exception:  # noqa: BLE001 - a foreign or corrupt value
                logger.warning("ignoring etcd key %s: not a WorkerInfo", key)
                return
            old = key_to_address.get(key)
            if old and old != info.address:
                self.registry.forget(old, f"re-registered as {info.address}")
            key_to_address[key] = info.address
            self.registry.register(info)

        def on_delete(key: str) -> None:
            address = key_to_address.pop(key, "")
            if address:
                self.registry.forget(address, "its etcd lease ended")

        self.etcd.watch(self.etcd_config.key("workers") + "/", on_put, on_delete)

    async def stop(self) -> None:
        if self.planner is not None:
            await self.planner.close()
        if self.etcd is not None:
            await self.etcd.close()
        if self.http is not None:
            await self.http.stop()
        if self.server is not None:
            await self.server.stop(grace=1.0)
        if self.registry is not None:
            await self.registry.close()
        if self.dispatcher is not None:
            await self.dispatcher.close()


async def serve(config: RouterConfig, etcd_config: EtcdConfig | None = None,
                planner_config: PlannerConfig | None = None) -> None:
    app = RouterApp(config, etcd_config, planner_config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    try:
        await stop.wait()
    finally:
        await app.stop()


def run(args: argparse.Namespace) -> int:
    asyncio.run(serve(config_from_args(RouterConfig, args), config_from_args(EtcdConfig, args),
                      config_from_args(PlannerConfig, args)))
    return 0
