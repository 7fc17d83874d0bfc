"""WorkerRuntime: what every worker process (prefill, decode, colocated) runs around its servicer.

Builds the engine (on its own thread), the KV transport (pdserve.transfer) with the KV pool registered, the
gRPC server with health and reflection, and the registration heartbeat to the router; tears all
of it down on SIGTERM / SIGINT. Holds the worker's current role (switched at run time by
pdserve/worker_roles.py) and advertises it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import replace

import grpc

from pdserve import rpc
from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.step_times import StepTimes
from pdserve.membership import Etcd, EtcdConfig
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.transfer.base import KVTransport
from pdserve.engine.connector import KV_BUFFER, WorkerConnector
from pdserve.transfer.config import TransferConfig
from pdserve.worker_config import WorkerConfig

logger = logging.getLogger(__name__)


def resolve_model(engine_config: EngineConfig) -> EngineConfig:
    """An empty --model means the built-in tiny model, made on first use."""
    if engine_config.model:
        return engine_config
    from pdserve.engine.builtin_model import ensure_builtin_model

    return replace(engine_config, model=str(ensure_builtin_model("tiny")))


class WorkerRuntime:
    def __init__(self, role: int, worker_config: WorkerConfig, engine_config: EngineConfig,
                 transfer_config: TransferConfig | None = None, etcd_config: EtcdConfig | None = None) -> None:
        self.role = role
        self.etcd_config = etcd_config if etcd_config is not None and etcd_config.etcd else None
        self.etcd: Etcd | None = None
        self.config = worker_config
        self.engine_config = resolve_model(engine_config)
        self.transfer_config = transfer_config or TransferConfig()
        self.engine: AsyncEngine | None = None
        self.transport: KVTransport | None = None
        self.connector: WorkerConnector | None = None  # the engine connector's worker side (not colocated)
        self.server: grpc.aio.Server | None = None
        self.health = None
        self.metrics_server = None
        self.store = None  # KVStoreClient when --kvstore-master is set
        self.address = ""
        self.worker_id = worker_config.worker_id
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.service_names: list[str] = []
        # serves both the prefill and the decode service, so its role can change (pdserve/worker_roles.py)
        self.switchable = worker_config.role_switching == "on" or (
            worker_config.role_switching == "auto" and role != pb.COLOCATED)
        self.target_role = pb.WORKER_ROLE_UNSPECIFIED  # while draining for a switch: the role it becomes
        self.num_role_switches = 0
        self.stats_parts: list[Callable[[pb.WorkerStats], None]] = []  # each service adds its counters
        self._advertise = asyncio.Event()  # set: heartbeat the routers now (the role or draining changed)
        self._etcd_key = ""

    @property
    def role_name(self) -> str:
        return pb.WorkerRole.Name(self.role).lower()

    async def start(self, add_servicers: Callable[[grpc.aio.Server], list[str]]) -> None:
        llm = await asyncio.to_thread(LLMEngine, self.engine_config)
        self.engine = AsyncEngine(llm)
        self.engine.start()
        c = self.config
        if self.role != pb.COLOCATED or self.switchable:  # a fixed colocated worker moves no KV between processes
            from pdserve.transfer.factory import create_transport

            self.transport = create_transport(self.transfer_config, c.host, c.transfer_port,
                                              num_lanes=c.transfer_lanes, timeout_s=c.transfer_timeout_s)
            # Registering first: memory the backend cannot move fails here, before anything listens.
            self.transport.register_buffer(KV_BUFFER, llm.kv_cache.kv)
            await self.transport.start()
            self.connector = WorkerConnector(self.transport, llm.kv_cache.layout())
            if c.kvstore_master:
                from pdserve.kvstore.client import KVStoreClient

                self.store = KVStoreClient(c.kvstore_master, self.transport, llm.kv_cache, llm.fingerprint,
                                           buffer_name=KV_BUFFER, timeout_s=min(5.0, c.transfer_timeout_s))
                await self.store.start()
                logger.info("using the KV cache store at %s", c.kvstore_master)
        self.server, self.health = rpc.create_server([])
        self.service_names = add_servicers(self.server)
        port = rpc.bind(self.server, c.host, c.port, c.tls_cert_file, c.tls_key_file)
        await self.server.start()
        host = c.advertise_host or c.host
        self.address = f"{host}:{port}"
        self.worker_id = self.worker_id or f"{self.role_name}@{self.address}"
        if c.metrics_port >= 0:
            from pdserve.metrics_server import MetricsServer, WorkerCollector

            collector = WorkerCollector(self.base_stats, lambda: getattr(self.transport, "stats", None))
            self.metrics_server = MetricsServer(c.host, c.metrics_port, collector)
            await self.metrics_server.start()
        await rpc.set_serving(self.health, self.service_names, True)
        logger.info("%s serving gRPC on %s, KV transfers on %s", self.worker_id, self.address, self.transfer_address)
        for router in [a.strip() for a in c.router.split(",") if a.strip()]:
            self._tasks.append(asyncio.create_task(self._register_loop(router)))
        if self.etcd_config is not None:
            self.etcd = Etcd(self.etcd_config)
            await self.etcd.connect()  # unreachable: a clear error naming the address, after --etcd-wait-s
            self._etcd_key = self.etcd_config.key("workers", self.worker_id)
            self.etcd.register(self._etcd_key, lambda: self.info(self.stats()).SerializeToString())

    @property
    def transfer_address(self) -> str:
        if self.transport is None:
            return ""
        host, _, port = self.transport.address.rpartition(":")
        return f"{self.config.advertise_host or host}:{port}"

    def info(self, stats: pb.WorkerStats | None = None) -> pb.WorkerInfo:
        llm = self.engine.engine if self.engine else None
        return pb.WorkerInfo(worker_id=self.worker_id, role=self.role, address=self.address,
                             transfer_address=self.transfer_address,
                             model_fingerprint=llm.fingerprint if llm else b"", healthy=True, stats=stats)

    @property
    def draining(self) -> bool:
        return self.target_role != pb.WORKER_ROLE_UNSPECIFIED

    def set_draining(self, target_role: int | None) -> None:
        """Start (target_role: what it becomes) or end (None) a drain, and tell the routers now."""
        self.target_role = target_role or pb.WORKER_ROLE_UNSPECIFIED
        self.advertise()

    def set_role(self, role: int) -> None:
        self.role = role
        self.num_role_switches += 1
        self.advertise()

    def advertise(self) -> None:
        """Re-register at once with every router and in etcd (role or draining changed)."""
        self._advertise.set()
        if self.etcd is not None and self._etcd_key:
            self.etcd.changed(self._etcd_key)

    def num_requests_in_flight(self) -> int:
        return int(self.stats().num_requests_active)

    def stats(self) -> pb.WorkerStats:
        """This worker's stats: the engine's and transport's, plus each service's part."""
        stats = self.base_stats()
        for add in self.stats_parts:
            add(stats)
        return stats

    def base_stats(self) -> pb.WorkerStats:
        assert self.engine is not None
        s = self.engine.engine.stats()
        agent_stats = getattr(self.transport, "stats", None)
        return pb.WorkerStats(
            worker_id=self.worker_id, role=self.role, num_running=s["num_running"], num_waiting=s["num_waiting"],
            num_kv_blocks=s["num_kv_blocks"], num_free_kv_blocks=s["num_free_kv_blocks"],
            prefix_cache_queries=s["prefix_cache_queries"], prefix_cache_hits=s["prefix_cache_hits"],
            num_prompt_tokens_computed=s["num_prompt_tokens_computed"],
            num_generation_tokens=s["num_generation_tokens"], num_preemptions=s["num_preemptions"],
            max_num_seqs=self.engine_config.max_num_seqs, block_size=self.engine_config.block_size,
            num_requests_active=len(self.engine.engine.requests),
            kv_bytes_sent=int(getattr(agent_stats, "bytes_sent", 0) or 0),
            kv_bytes_received=int(getattr(agent_stats, "bytes_received", 0) or 0),
            num_transfers_failed=int(getattr(agent_stats, "num_failures", 0) or 0),
            draining=self.draining, target_role=self.target_role, num_role_switches=self.num_role_switches,
            spec_num_drafts=s["spec_drafts"], spec_num_draft_tokens=s["spec_proposed_tokens"],
            spec_num_accepted_tokens=s["spec_accepted_tokens"],
            **{k: s[k] for k in StepTimes.fields()},
        )

    async def _register_loop(self, router: str) -> None:
        """Register with the router, then heartbeat at the interval it asks for."""
        interval = 1.0
        async with rpc.channel(router, self.config.router_tls_ca_file) as ch:
            stub = pb_grpc.RouterStub(ch)
            while not self._stop.is_set():
                try:
                    self._advertise.clear()
                    resp = await stub.RegisterWorker(pb.RegisterWorkerRequest(worker=self.info(self.stats())),
                                                     timeout=2.0)
                    interval = resp.heartbeat_interval_s or interval
                    wait_s = interval
                except grpc.aio.AioRpcError as exc:
                    logger.debug("registration with %s failed: %s", router, exc.code().name)
                    wait_s = min(interval, 0.5)  # a restarted router learns this worker within a second
                stop, advertise = asyncio.ensure_future(self._stop.wait()), asyncio.ensure_future(self._advertise.wait())
                try:
                    await asyncio.wait([stop, advertise], timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stop.cancel()
                    advertise.cancel()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)

    async def wait(self) -> None:
        await self._stop.wait()

    def request_stop(self) -> None:
        self._stop.set()

    async def stop(self, on_stop: Callable[[], object] | None = None) -> None:
        self._stop.set()
        if self.etcd is not None:  # first: routers stop sending here at once
            await self.etcd.close()
        if self.health is not None:
            await rpc.set_serving(self.health, self.service_names, False)
        for task in self._tasks:
            task.cancel()
        if self.server is not None:
            await self.server.stop(grace=1.0)
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        if on_stop is not None:
            result = on_stop()
            if asyncio.iscoroutine(result):
                await result
        if self.engine is not None:
            await self.engine.stop()
        if self.store is not None:
            await self.store.close()
        if self.transport is not None:
            await self.transport.close()
        logger.info("%s stopped", self.worker_id)


def run_worker(main_coro_factory: Callable[[], object]) -> int:
    """asyncio.run a worker's main coroutine (uvloop is not used: ucxx needs the default loop)."""
    asyncio.run(main_coro_factory())  # type: ignore[arg-type]
    return 0
