"""`pdserve kvstore-node`: a KV cache store node. Holds block values in a slotted memory pool
(node_pool.py) registered with its own KV transport (pdserve.transfer), registers and heartbeats to the master, and
issues the transfer tokens for its pool over a small gRPC service:

- write: PrepareWrite checks the slots and sizes, opens an expectation and returns its one-time
  token; the client pushes the values into the slots; the node adds them to its inventory once
  every byte landed.
- read: PrepareRead returns what the node holds at the asked slots (the client checks these claims
  against the master's metadata before any byte moves) and a token exposing exactly those regions;
  the client pulls them into its own KV pool. Reads are pulls so that the client's pool is written
  only by the client's own transport.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import signal
from dataclasses import replace

import grpc

from pdserve import rpc
from pdserve.errors import InvalidRequest, KVTransferError
from pdserve.proto import kvstore_pb2 as kpb
from pdserve.proto import kvstore_pb2_grpc as kpb_grpc
from pdserve.membership import EtcdConfig
from pdserve.settings import add_config_arguments, config_from_args
from pdserve.transfer.base import KVTransport
from pdserve.transfer.config import TransferConfig

from .config import NodeConfig
from .values import NodeInfo, StoredValue, ValueMeta
from .messages import node_to_pb, value_from_pb, value_to_pb

logger = logging.getLogger(__name__)

SERVICE_NAME = "pdserve.kvstore.v1.KVStoreNode"
POOL_BUFFER = "kvstore-pool"
MIN_TOKEN_TIMEOUT_S = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, NodeConfig, title="kvstore node")
    add_config_arguments(parser, TransferConfig, title="transfer")
    add_config_arguments(parser, EtcdConfig, title="etcd")


class NodeServicer(kpb_grpc.KVStoreNodeServicer):
    def __init__(self, node: StoreNode) -> None:
        self.node = node

    @rpc.map_errors
    async def PrepareWrite(self, request: kpb.PrepareWriteRequest, context) -> kpb.PrepareWriteResponse:
        values = [value_from_pb(v) for v in request.values]
        return kpb.PrepareWriteResponse(token=self.node.prepare_write(values, request.timeout_s))

    @rpc.map_errors
    async def PrepareRead(self, request: kpb.PrepareReadRequest, context) -> kpb.PrepareReadResponse:
        values = [value_from_pb(v) for v in request.values]
        token, claims = await self.node.prepare_read(values, request.timeout_s)
        return kpb.PrepareReadResponse(token=token, values=[value_to_pb(c) if c else kpb.StoredValue() for c in claims])

    @rpc.map_errors
    async def Stats(self, request: kpb.NodeStatsRequest, context) -> kpb.NodeStats:
        pool = self.node.pool
        return kpb.NodeStats(node=node_to_pb(self.node.info()), num_slots=pool.num_slots, num_values=pool.num_values)


class StoreNode:
    """The node's parts, built and torn down together."""

    def __init__(self, config: NodeConfig, transfer_config: TransferConfig | None = None) -> None:
        from .node_pool import NodePool

        self.config = config
        self.transfer_config = transfer_config or TransferConfig()
        self.pool = NodePool(config.capacity_mb * 2**20, config.slot_kb * 1024, config.memory)
        self.transport: KVTransport | None = None
        self.server: grpc.aio.Server | None = None
        self.health = None
        self.address = ""
        self.node_id = config.node_id
        self._pending: dict[bytes, asyncio.Future] = {}  # key being written -> done when it landed (or failed)
        self._tasks: set[asyncio.Task] = set()
        self._heartbeat_task: asyncio.Task | None = None
        self._master: grpc.aio.Channel | None = None
        self.metrics_server = None

    def info(self) -> NodeInfo:
        return NodeInfo(self.node_id, self.address, self.transport.address, self.pool.capacity_bytes, self.pool.slot_nbytes)

    async def start(self) -> None:
        from pdserve.transfer.factory import create_transport

        c = self.config
        # The transfer listener accepts on every interface; the host given here is what peers are told.
        self.transport = create_transport(self.transfer_config, c.advertise_host or c.host, c.transfer_port,
                                          num_lanes=c.transfer_lanes, timeout_s=c.transfer_timeout_s)
        self.transport.register_buffer(POOL_BUFFER, self.pool.buffer)  # device memory a backend cannot move fails here
        await self.transport.start()
        self.server, self.health = rpc.create_server([SERVICE_NAME])
        kpb_grpc.add_KVStoreNodeServicer_to_server(NodeServicer(self), self.server)
        port = rpc.bind(self.server, c.host, c.port)
        await self.server.start()
        self.address = f"{c.advertise_host or c.host}:{port}"
        self.node_id = self.node_id or f"node@{self.address}"
        self._master = rpc.channel(c.master)
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop())
        if c.metrics_port >= 0:
            from pdserve.metrics_server import MetricsServer

            from .metrics import NodeCollector

            self.metrics_server = MetricsServer(c.host, c.metrics_port, NodeCollector(self), what="kvstore node")
            await self.metrics_server.start()
        await rpc.set_serving(self.health, [SERVICE_NAME], True)  # health is the node itself, never the master
        logger.info("kvstore node %s: %d MiB pool, gRPC %s, transfer %s, master %s", self.node_id, c.capacity_mb,
                    self.address, self.transport.address, c.master)

    async def stop(self) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        if self.server is not None:
            await self.server.stop(grace=0.5)
        if self.transport is not None:
            await self.transport.close()
        if self._master is not None:
            await self._master.close()

    # ---- master ----------------------------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        stub = kpb_grpc.KVStoreMasterStub(self._master)
        interval_s = 0.5
        registered = False
        warned = False
        while True:
            try:
                if not registered:
                    resp = await stub.RegisterNode(kpb.RegisterNodeRequest(
                        node=node_to_pb(self.info()), inventory=[value_to_pb(v) for v in self.pool.inventory()]),
                        timeout=5.0)
                    self.pool.drop([bytes(k) for k in resp.rejected_keys])
                    interval_s = resp.heartbeat_interval_s or interval_s
                    registered = True
                    logger.info("registered with master %s (%d values, %d refused)", self.config.master,
                                self.pool.num_values, len(resp.rejected_keys))
                else:
                    await stub.Heartbeat(kpb.HeartbeatRequest(node_id=self.node_id), timeout=interval_s * 2)
                warned = False
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    logger.info("master %s does not know this node: sending the full inventory", self.config.master)
                    registered = False
                    continue
                if not warned:
                    logger.warning("master %s unreachable: %s", self.config.master, exc.code().name)
                    warned = True
            await asyncio.sleep(interval_s)

    # ---- writes ----------------------------------------------------------------------------------
    def prepare_write(self, values: list[StoredValue], timeout_s: float) -> bytes:
        regions = self.pool.check_write(values)
        token = secrets.token_bytes(16)
        exp = self.transport.expect(token, POOL_BUFFER, regions, max(timeout_s, MIN_TOKEN_TIMEOUT_S))
        self.pool.begin_write(values)
        loop = asyncio.get_running_loop()
        landed = loop.create_future()
        for value in values:
            self._pending[value.key] = landed
        task = asyncio.create_task(self._finish_write(exp, values, landed))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return token

    async def _finish_write(self, exp, values: list[StoredValue], landed: asyncio.Future) -> None:
        try:
            await exp.wait()
            self.pool.commit(values)
        except KVTransferError as exc:
            logger.info("write of %d values failed: %s", len(values), exc)
        finally:
            for value in values:
                if self._pending.get(value.key) is landed:
                    del self._pending[value.key]
            landed.set_result(None)

    # ---- reads -----------------------------------------------------------------------------------
    async def prepare_read(self, values: list[StoredValue],
                           timeout_s: float) -> tuple[bytes, list[StoredValue | None]]:
        """A token exposing the held values, and per asked value what this node claims it holds (None: absent)."""
        if not values:
            raise InvalidRequest("no values to read")
        waits = {id(f): f for v in values if (f := self._pending.get(v.key)) is not None}
        if waits:  # a write the client just committed may still be finishing here
            await asyncio.wait(list(waits.values()), timeout=timeout_s)
        claims: list[StoredValue | None] = []
        for value in values:
            held = self.pool.get(value.key)
            if held is not None and self.config.fault_lie_about_sizes:
                meta = held.meta
                held = replace(held, meta=ValueMeta(meta.nbytes // 2, meta.dtype, meta.shape, meta.fingerprint))
            claims.append(held)
        regions = [(c.offset, c.meta.nbytes) for c in claims if c is not None]
        if not regions:
            return b"", claims
        token = secrets.token_bytes(16)
        self.transport.expose(token, POOL_BUFFER, regions, max(timeout_s, MIN_TOKEN_TIMEOUT_S))
        return token, claims


async def serve(config: NodeConfig, transfer_config: TransferConfig | None = None,
                etcd_config: EtcdConfig | None = None) -> None:
    node = StoreNode(config, transfer_config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    etcd = None
    if etcd_config is not None and etcd_config.etcd:
        from pdserve.membership import Etcd

        etcd = Etcd(etcd_config)
        await etcd.connect()
    await node.start()
    if etcd is not None:  # membership only: the node finds the leading master through --master's address list
        etcd.register(etcd_config.key("kvstore", "nodes", node.node_id), node.address.encode)
    try:
        await stop.wait()
    finally:
        if etcd is not None:
            await etcd.close()
        await node.stop()


def run(args: argparse.Namespace) -> int:
    asyncio.run(serve(config_from_args(NodeConfig, args), config_from_args(TransferConfig, args),
                      config_from_args(EtcdConfig, args)))
    return 0
