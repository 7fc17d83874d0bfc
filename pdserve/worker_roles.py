"""A worker's role at run time and how it changes: which services a worker process serves, and the
WorkerControl service whose SetRole drains the worker and switches it (prefill, decode, colocated).

A switchable worker (`--role-switching`) serves both the PrefillWorker and the DecodeWorker services
whatever its role: a request routed to it under the old role still completes after a switch. The role
only says what routers send it. A switch stops new work (the worker reports `draining`, routers route
around it at once), waits until every request it holds has finished (nothing lost, nothing
recomputed), then advertises the new role (registration heartbeat and etcd at once). A switch to
colocated is widening (a colocated worker does all a prefill or a decode worker does; what it holds
carries on under the services it was sent to): no drain, the new role is advertised at once. Does not own the
services themselves (prefill/servicer.py, decode/servicer.py) or what a role means to the router
(router/policy.py).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from pdserve.engine.config import EngineConfig
from pdserve.errors import InvalidRequest, Overloaded
from pdserve.membership import EtcdConfig
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.rpc import map_errors
from pdserve.transfer.config import TransferConfig
from pdserve.worker_config import WorkerConfig
from pdserve.worker_runtime import WorkerRuntime

logger = logging.getLogger(__name__)

ROLES = (pb.PREFILL, pb.DECODE, pb.COLOCATED)
DRAIN_POLL_S = 0.05


class RoleControl(pb_grpc.WorkerControlServicer):
    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime
        self._switching = asyncio.Lock()

    @map_errors
    async def SetRole(self, request: pb.SetRoleRequest, context: grpc.aio.ServicerContext) -> pb.SetRoleResponse:
        rt = self.runtime
        role = request.role
        if role not in ROLES:
            raise InvalidRequest(f"role {role} is not one of PREFILL, DECODE, COLOCATED", param="role")
        if not rt.switchable and role != rt.role:
            raise InvalidRequest(f"{rt.worker_id} was started with --role-switching off: it serves only the "
                                 f"{rt.role_name} role; restart it with --role-switching on", param="role")
        if self._switching.locked():
            raise Overloaded(f"{rt.worker_id} is already switching to {pb.WorkerRole.Name(rt.target_role)}; "
                             "retry when it is done", retry_after_s=1.0)
        async with self._switching:
            previous = rt.role
            if role == previous:
                return pb.SetRoleResponse(previous_role=previous, role=role)
            timeout_s = request.drain_timeout_s or rt.config.drain_timeout_s
            why = request.reason or "no reason given"
            started = time.monotonic()
            if role == pb.COLOCATED:
                # widening: a colocated worker does everything a prefill or a decode worker does, and the
                # requests it holds keep the services they were sent to: nothing stops, nothing to drain
                rt.set_role(role)
                logger.info("%s: now %s (%s; widening: no drain, %d requests carry on)", rt.worker_id,
                            rt.role_name, why, rt.num_requests_in_flight())
                return pb.SetRoleResponse(previous_role=previous, role=role, drain_seconds=0.0, num_drained=0)
            num_drained = rt.num_requests_in_flight()
            logger.info("%s: switching %s -> %s (%s): draining %d requests", rt.worker_id, rt.role_name,
                        pb.WorkerRole.Name(role).lower(), why, num_drained)
            rt.set_draining(role)
            try:
                while (left := rt.num_requests_in_flight()) > 0:
                    if time.monotonic() - started > timeout_s:
                        raise Overloaded(f"{rt.worker_id} still holds {left} requests after draining {timeout_s:.0f} "
                                         f"s; role unchanged ({rt.role_name})", retry_after_s=timeout_s)
                    await asyncio.sleep(DRAIN_POLL_S)
                rt.set_role(role)
            finally:
                rt.set_draining(None)
            drain_s = time.monotonic() - started
            logger.info("%s: now %s (drained %d requests in %.2f s)", rt.worker_id, rt.role_name, num_drained, drain_s)
            return pb.SetRoleResponse(previous_role=previous, role=role, drain_seconds=drain_s,
                                      num_drained=num_drained)


async def serve(role: int, worker_config: WorkerConfig, engine_config: EngineConfig,
                transfer_config: TransferConfig | None = None, etcd_config: EtcdConfig | None = None) -> None:
    """Run one worker process (`pdserve prefill`, `pdserve decode`, `pdserve worker`) until SIGTERM."""
    from pdserve.decode.server import add_decode_service
    from pdserve.prefill.server import add_prefill_service

    runtime = WorkerRuntime(role, worker_config, engine_config, transfer_config, etcd_config)
    runtime.install_signal_handlers()
    tables = []  # the decode service's ReservationTable, released at stop

    def add(server) -> list[str]:
        names = []
        if runtime.switchable or role == pb.PREFILL:
            names.append(add_prefill_service(runtime, server))
        if runtime.switchable or role != pb.PREFILL:
            name, table = add_decode_service(runtime, server)
            names.append(name)
            tables.append(table)
        pb_grpc.add_WorkerControlServicer_to_server(RoleControl(runtime), server)
        return [*names, "pdserve.v1.WorkerControl"]

    try:
        await runtime.start(add)
        await runtime.wait()
    finally:
        await runtime.stop(lambda: tables[0].release_all() if tables else None)
