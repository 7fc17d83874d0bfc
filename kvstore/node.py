"""`pdserve kvstore-node`: a KV cache store node. Holds block values in a pool of two tiers
(node_pool.py: a DRAM buffer registered with its own KV transport, pdserve.transfer, and an SSD file,
node_ssd.py; node_tiers.py moves values between them), registers and heartbeats to the master, and
issues the transfer tokens for its pool over a small gRPC service:

- write: PrepareWrite checks the slots and sizes, gives each value a DRAM frame (demoting the least
  recently used values to SSD when DRAM is full), opens an expectation on those frames and returns
  its one-time token and their offsets; the client pushes the values there; the node adds them to
  its inventory once every byte landed.
- read: PrepareRead returns what the node holds at the asked slots (the client checks these claims
  against the master's metadata before any byte moves), promoting SSD values to DRAM first, and a
  token exposing exactly those frames, with their offsets; the client pulls them into its own KV
  pool. Reads are pulls so that the client's pool is written only by the client's own transport.
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
from pdserve.transfer.regions import Region

from .config import NodeConfig
from .messages import node_to_pb, value_from_pb, value_to_pb
from .values import NodeInfo, StoredValue, ValueMeta

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
        token, regions = await self.node.prepare_write(values, request.timeout_s)
        return kpb.PrepareWriteResponse(token=token, offsets=[start for start, _ in regions])

    @rpc.map_errors
    async def PrepareRead(self, request: kpb.PrepareReadRequest, context) -> kpb.PrepareReadResponse:
        values = [value_from_pb(v) for v in request.values]
        token, claims, offsets = await self.node.prepare_read(values, request.timeout_s)
        return kpb.PrepareReadResponse(token=token, values=[value_to_pb(c) if c else kpb.StoredValue() for c in claims],
                                       offsets=offsets)

    @rpc.map_errors
    async def FinishRead(self, request: kpb.FinishReadRequest, context) -> kpb.FinishReadResponse:
        await self.node.finish_read(bytes(request.token))
        return kpb.FinishReadResponse()

    @rpc.map_errors
    async def Stats(self, request: kpb.NodeStatsRequest, context) -> kpb.NodeStats:
        pool = self.node.pool
        return kpb.NodeStats(node=node_to_pb(self.node.info()), num_slots=pool.num_slots, num_values=pool.num_values,
                             tiers=self.node.tiers.stats())


class StoreNode:
    """The node's parts, built and torn down together."""

    def __init__(self, config: NodeConfig, transfer_config: TransferConfig | None = None) -> None:
        from .node_pool import NodePool
        from .node_tiers import NodeTiers

        self.config = config
        self.transfer_config = transfer_config or TransferConfig()
        ssd_bytes = config.ssd_mb * 2**20 if config.ssd_dir else 0
        self.pool = NodePool(config.capacity_mb * 2**20, config.slot_kb * 1024, config.memory, ssd_bytes)
        self.tiers = NodeTiers(self.pool, None, config.ssd_batch_blocks)
        self.transport: KVTransport | None = None
        self.server: grpc.aio.Server | None = None
        self.health = None
        self.address = ""
        self.node_id = config.node_id
        self._pending: dict[bytes, asyncio.Future] = {}  # key being written -> done when it landed (or failed)
        self._reads: dict[bytes, tuple[list[int], asyncio.TimerHandle]] = {}  # read token -> (pinned frames, expiry)
        self._tasks: set[asyncio.Task] = set()
        self._heartbeat_task: asyncio.Task | None = None
        self._master: grpc.aio.Channel | None = None
        self.metrics_server = None

    def info(self) -> NodeInfo:
        return NodeInfo(self.node_id, self.address, self.transport.address, self.pool.capacity_bytes,
                        self.pool.slot_nbytes, self.pool.ssd_bytes)

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
        self._open_ssd()
        self._master = rpc.channel(c.master)
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop())
        if c.metrics_port >= 0:
            from pdserve.metrics_server import MetricsServer

            from .metrics import NodeCollector

            self.metrics_server = MetricsServer(c.host, c.metrics_port, NodeCollector(self), what="kvstore node")
            await self.metrics_server.start()
        await rpc.set_serving(self.health, [SERVICE_NAME], True)  # health is the node itself, never the master
        ssd = f" + SSD {self.pool.ssd_bytes >> 20} MiB in {c.ssd_dir}" if self.pool.ssd_bytes else ""
        logger.info("kvstore node %s: DRAM %d MiB%s, gRPC %s, transfer %s, master %s", self.node_id, c.capacity_mb,
                    ssd, self.address, self.transport.address, c.master)

    def _open_ssd(self) -> None:
        """The SSD tier, before the master learns this node's slots; off (one log line) when it cannot be."""
        from .node_ssd import SSDTier

        c = self.config
        if not self.pool.ssd_bytes:
            return
        ssd = self.tiers.ssd = SSDTier(c.ssd_dir, self.pool.ssd_bytes, self.node_id)  # kept off for its reason
        if c.memory != "host":
            ssd.turn_off("the SSD tier needs --memory host")
        elif ssd.open():
            self.tiers.fixed_slot_size()
            return
        self.pool.turn_off_ssd()
        self.pool.ssd_bytes = 0  # the master sees a DRAM-only node

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
        if self.tiers.ssd is not None:
            self.tiers.ssd.close()
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
                    self.pool.report_all_tiers()  # the master assumes DRAM: the next heartbeat says what is not
                    interval_s = resp.heartbeat_interval_s or interval_s
                    registered = True
                    logger.info("registered with master %s (%d values, %d refused)", self.config.master,
                                self.pool.num_values, len(resp.rejected_keys))
                else:
                    changes = self.pool.tier_changes()
                    await stub.Heartbeat(kpb.HeartbeatRequest(
                        node_id=self.node_id, tiers=self.tiers.stats(),
                        ssd_keys=[k for k, on_ssd in changes.items() if on_ssd],
                        dram_keys=[k for k, on_ssd in changes.items() if not on_ssd]), timeout=interval_s * 2)
                    self.pool.ack_tier_changes(changes)
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
    async def prepare_write(self, values: list[StoredValue], timeout_s: float) -> tuple[bytes, list[Region]]:
        """A one-time token for pushing the values, and the regions of the pool buffer they go to."""
        self.pool.check_write(values)
        self.tiers.fixed_slot_size()
        regions = await self.tiers.begin_write(values)
        token = secrets.token_bytes(16)
        try:
            exp = self.transport.expect(token, POOL_BUFFER, regions, max(timeout_s, MIN_TOKEN_TIMEOUT_S))
        except Exception:
            self.pool.fail_write(values, regions)
            raise
        loop = asyncio.get_running_loop()
        landed = loop.create_future()
        for value in values:
            self._pending[value.key] = landed
        task = asyncio.create_task(self._finish_write(exp, values, regions, landed))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return token, regions

    async def _finish_write(self, exp, values: list[StoredValue], regions: list[Region],
                            landed: asyncio.Future) -> None:
        committed = False
        try:
            await exp.wait()
            self.pool.commit(values, regions)
            committed = True
        except KVTransferError as exc:
            logger.info("write of %d values failed: %s", len(values), exc)
        finally:
            if not committed:
                self.pool.fail_write(values, regions)
            for value in values:
                if self._pending.get(value.key) is landed:
                    del self._pending[value.key]
            landed.set_result(None)

    # ---- reads -----------------------------------------------------------------------------------
    async def prepare_read(self, values: list[StoredValue],
                           timeout_s: float) -> tuple[bytes, list[StoredValue | None], list[int]]:
        """A token exposing the held values; per asked value what this node claims it holds (None:
        absent) and where in the pool buffer to read it. SSD values are promoted to DRAM first; the
        exposed frames stay pinned (never moved or reused) until the token expires."""
        if not values:
            raise InvalidRequest("no values to read")
        waits = {id(f): f for v in values if (f := self._pending.get(v.key)) is not None}
        if waits:  # a write the client just committed may still be finishing here
            await asyncio.wait(list(waits.values()), timeout=timeout_s)
        frames = await self.tiers.pin_for_read(values)
        claims: list[StoredValue | None] = []
        offsets: list[int] = []
        for value, frame in zip(values, frames):
            held = self.pool.get(value.key) if frame is not None else None
            if held is not None and self.config.fault_lie_about_sizes:
                meta = held.meta
                held = replace(held, meta=ValueMeta(meta.nbytes // 2, meta.dtype, meta.shape, meta.fingerprint))
            claims.append(held)
            offsets.append(frame * self.pool.slot_nbytes if frame is not None else 0)
        pinned = [f for f in frames if f is not None]
        if not pinned:
            return b"", claims, offsets
        token_timeout_s = max(timeout_s, MIN_TOKEN_TIMEOUT_S)
        token = secrets.token_bytes(16)
        try:
            self.transport.expose(token, POOL_BUFFER, [(off, c.meta.nbytes) for c, off in zip(claims, offsets)
                                                       if c is not None], token_timeout_s)
        except Exception:
            self.pool.unpin(pinned)
            raise
        # unpinned at FinishRead, or once no reader can use the token any more
        expiry = asyncio.get_running_loop().call_later(token_timeout_s + MIN_TOKEN_TIMEOUT_S, self._end_read, token)
        self._reads[token] = (pinned, expiry)
        return token, claims, offsets

    async def finish_read(self, token: bytes) -> None:
        """The reader is done: no pull under its token is accepted any more (retired, not cancelled: cancelling
        would abort the lane that just served it, which the reader's next pull reuses), and its frames may
        move or be reused now."""
        if self.transport is not None:
            self.transport.retire(token)
        self._end_read(token)

    def _end_read(self, token: bytes) -> None:
        entry = self._reads.pop(token, None)
        if entry is not None:
            entry[1].cancel()
            self.pool.unpin(entry[0])


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
