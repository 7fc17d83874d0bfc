"""`pdserve kvstore-master`: the KV cache store's master, serving `master_state.MasterState` over gRPC.

Holds only metadata (which node slot holds which block value); the bytes live on the nodes and
move over UCX between nodes and clients. Its state is rebuilt from the nodes' inventories after
a restart: a node whose heartbeat gets NOT_FOUND re-registers with everything it holds. With
--etcd, several masters run and the one holding the etcd leader key serves (`MasterProcess`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from pdserve import rpc
from pdserve.errors import NotFound
from pdserve.membership import EtcdConfig
from pdserve.proto import kvstore_pb2 as kpb
from pdserve.proto import kvstore_pb2_grpc as kpb_grpc
from pdserve.settings import add_config_arguments, config_from_args

from .config import MasterConfig
from .master_state import MasterState
from .messages import key_of, location_to_pb, meta_from_pb, node_from_pb, node_to_pb, value_from_pb

logger = logging.getLogger(__name__)

SERVICE_NAME = "pdserve.kvstore.v1.KVStoreMaster"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, MasterConfig, title="kvstore master")
    add_config_arguments(parser, EtcdConfig, title="etcd")


class MasterServicer(kpb_grpc.KVStoreMasterServicer):
    def __init__(self, state: MasterState) -> None:
        self.state = state

    @rpc.map_errors
    async def RegisterNode(self, request: kpb.RegisterNodeRequest, context) -> kpb.RegisterNodeResponse:
        inventory = [value_from_pb(v) for v in request.inventory]
        rejected = self.state.register_node(node_from_pb(request.node), inventory)
        return kpb.RegisterNodeResponse(rejected_keys=rejected,
                                        heartbeat_interval_s=self.state.config.heartbeat_interval_s)

    @rpc.map_errors
    async def Heartbeat(self, request: kpb.HeartbeatRequest, context) -> kpb.HeartbeatResponse:
        if not self.state.heartbeat(request.node_id, request.tiers if request.HasField("tiers") else None,
                                    [key_of(k) for k in request.ssd_keys],
                                    [key_of(k) for k in request.dram_keys]):
            raise NotFound(f"unknown node {request.node_id!r}: register again")
        return kpb.HeartbeatResponse()

    @rpc.map_errors
    async def BatchLookup(self, request: kpb.BatchLookupRequest, context) -> kpb.BatchLookupResponse:
        n = self.state.lookup([key_of(k) for k in request.keys], bytes(request.model_fingerprint))
        return kpb.BatchLookupResponse(num_stored_prefix=n)

    @rpc.map_errors
    async def PutStart(self, request: kpb.PutStartRequest, context) -> kpb.PutStartResponse:
        plan = self.state.put_start([key_of(k) for k in request.keys], meta_from_pb(request.meta))
        return kpb.PutStartResponse(
            put_id=plan.put_id, placements=[kpb.Copies(copies=[location_to_pb(c) for c in cs]) for cs in plan.placements],
            already_stored=plan.already_stored, refused=plan.refused, expires_in_s=plan.expires_in_s)

    @rpc.map_errors
    async def PutCommit(self, request: kpb.PutCommitRequest, context) -> kpb.PutCommitResponse:
        return kpb.PutCommitResponse(num_committed=self.state.put_commit(request.put_id, list(request.failed_node_ids)))

    @rpc.map_errors
    async def PutAbort(self, request: kpb.PutAbortRequest, context) -> kpb.PutAbortResponse:
        self.state.put_abort(request.put_id)
        return kpb.PutAbortResponse()

    @rpc.map_errors
    async def GetStart(self, request: kpb.GetStartRequest, context) -> kpb.GetStartResponse:
        plan = self.state.get_start([key_of(k) for k in request.keys], bytes(request.model_fingerprint))
        return kpb.GetStartResponse(lease_id=plan.lease_id, locations=[location_to_pb(loc) for loc in plan.locations],
                                    lease_s=plan.lease_s)

    @rpc.map_errors
    async def GetDone(self, request: kpb.GetDoneRequest, context) -> kpb.GetDoneResponse:
        return kpb.GetDoneResponse(found=self.state.get_done(request.lease_id))

    @rpc.map_errors
    async def Stats(self, request: kpb.MasterStatsRequest, context) -> kpb.MasterStats:
        s = self.state
        s.expire()
        c = s.counters
        return kpb.MasterStats(
            num_keys=s.num_keys, num_leases=s.num_leases, num_pending_puts=s.num_pending_puts,
            num_evictions=c.num_evictions, num_dead_nodes=c.num_dead_nodes, num_expired_leases=c.num_expired_leases,
            num_expired_puts=c.num_expired_puts, num_rejected_inventory=c.num_rejected_inventory,
            nodes=[kpb.NodeStats(node=node_to_pb(info), num_slots=total, num_slots_used=used, num_values=values,
                                 tiers=s.node_tiers(info.node_id))
                   for info, used, total, values in s.node_infos()])


async def _expire_loop(state: MasterState) -> None:
    """Dead nodes leave the map even when no request arrives."""
    while True:
        await asyncio.sleep(state.config.heartbeat_interval_s)
        state.expire()


class MasterProcess:
    """The master's gRPC server, metrics and expiry loop. Alone it serves at once; with etcd it is a
    candidate: it binds its port only while it leads (so clients' failover channels and readiness
    probes find only the leader), starts from an empty map that the nodes refill with their
    inventories (a node whose heartbeat gets NOT_FOUND registers again with everything it holds),
    and closes the port as soon as it loses the lease (fencing)."""

    def __init__(self, config: MasterConfig) -> None:
        self.config = config
        self.state: MasterState | None = None
        self.server = None
        self.metrics = None
        self.expirer: asyncio.Task | None = None
        self.term = 0  # times this process has started leading

    async def lead(self) -> None:
        c = self.config
        self.term += 1
        self.state = MasterState(c)
        self.server, health = rpc.create_server([SERVICE_NAME])
        kpb_grpc.add_KVStoreMasterServicer_to_server(MasterServicer(self.state), self.server)
        port = rpc.bind(self.server, c.host, c.port)
        await self.server.start()
        if c.metrics_port >= 0:
            from pdserve.metrics_server import MetricsServer

            from .metrics import MasterCollector

            self.metrics = MetricsServer(c.host, c.metrics_port, MasterCollector(self.state), what="kvstore master")
            await self.metrics.start()
        self.expirer = asyncio.create_task(_expire_loop(self.state))
        await rpc.set_serving(health, [SERVICE_NAME], True)
        logger.info("kvstore master serving on %s:%d (replication %d, watermarks %.2f/%.2f)", c.host, port,
                    c.replication, c.low_watermark, c.high_watermark)

    async def step_down(self) -> None:
        if self.expirer is not None:
            self.expirer.cancel()
            self.expirer = None
        if self.metrics is not None:
            await self.metrics.stop()
            self.metrics = None
        if self.server is not None:
            await self.server.stop(grace=0.5)
            self.server = None
        self.state = None


async def serve(config: MasterConfig, etcd_config: EtcdConfig | None = None) -> None:
    master = MasterProcess(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    etcd = election = None
    if etcd_config is not None and etcd_config.etcd:
        from pdserve.membership import Election, Etcd
        from pdserve.metrics_server import MetricsServer  # noqa: F401 - imported before leading, not during

        from .metrics import MasterCollector  # noqa: F401

        if config.port == 0:
            raise ValueError("a master elected through etcd needs a fixed --port (clients list every master's address)")
        etcd = Etcd(etcd_config)
        await etcd.connect()
        address = f"{config.advertise_host or config.host}:{config.port}"
        etcd.register(etcd_config.key("kvstore", "masters", address), address.encode)
        election = Election(etcd, etcd_config.key("kvstore", "leader"), address.encode(), master.lead,
                            master.step_down, ttl_s=config.election_ttl_s)
        election.start()
        logger.info("kvstore master %s: standby until it wins %s in etcd %s", address,
                    etcd_config.key("kvstore", "leader"), etcd_config.etcd)
    else:
        await master.lead()
    try:
        await stop.wait()
    finally:
        if election is not None:
            await election.resign()
        await master.step_down()
        if etcd is not None:
            await etcd.close()


def run(args: argparse.Namespace) -> int:
    asyncio.run(serve(config_from_args(MasterConfig, args), config_from_args(EtcdConfig, args)))
    return 0
