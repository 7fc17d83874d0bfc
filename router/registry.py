"""The router's view of its workers: who exists (static flags or registration), who is healthy
(Stats polled on an interval), and how loaded each is. Which one a request goes to is router/policy.py's decision.

Health reflects each worker itself: a poll that fails `unhealthy_after` times in a row takes it
out of rotation until a poll succeeds again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc

from pdserve import rpc
from pdserve.engine.step_times import StepTimes
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.router.config import RouterConfig
from pdserve.router.policy import worker_load
from pdserve.router.worker_speed import WorkerSpeed

logger = logging.getLogger(__name__)


@dataclass
class Worker:
    address: str
    role: int
    worker_id: str = ""
    transfer_address: str = ""
    fingerprint: bytes = b""
    static: bool = False
    healthy: bool = False
    draining: bool = False  # switching role (its Stats or registration say so, or a planner asked): route nothing new
    consecutive_failures: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    stats: pb.WorkerStats = field(default_factory=pb.WorkerStats)
    speed: WorkerSpeed = field(default_factory=WorkerSpeed)  # learnt from its stats' step times at every poll
    inflight: int = 0  # requests the router has sent here and not yet finished
    queued_prompt_tokens: int = 0  # prompt tokens sent here for prefill (remote, or local on decode) not yet answered
    channel: grpc.aio.Channel | None = None
    tls_ca_file: str = ""  # dial the worker over TLS, trusting this CA (RouterConfig.worker_tls_ca_file)

    def __post_init__(self) -> None:
        self.channel = rpc.channel(self.address, self.tls_ca_file)
        self.decode_stub = pb_grpc.DecodeWorkerStub(self.channel)
        self.prefill_stub = pb_grpc.PrefillWorkerStub(self.channel)
        self.control_stub = pb_grpc.WorkerControlStub(self.channel)  # SetRole (pdserve/worker_roles.py)

    @property
    def role_name(self) -> str:
        return pb.WorkerRole.Name(self.role).lower()

    def load(self) -> float:
        return worker_load(self.stats, self.inflight)


class WorkerRegistry:
    def __init__(self, config: RouterConfig, fingerprint: bytes) -> None:
        self.config = config
        self.fingerprint = fingerprint
        self.workers: dict[str, Worker] = {}  # address -> worker
        self._poller: asyncio.Task | None = None
        self._rr = 0
        self._forgotten: list[Worker] = []  # taken out by `forget`; channels closed at close()

    def add_static(self) -> None:
        c = self.config
        for role, addresses in ((pb.PREFILL, c.prefill_workers), (pb.DECODE, c.decode_workers),
                                (pb.COLOCATED, c.colocated_workers)):
            for address in RouterConfig.split(addresses):
                self.workers[address] = Worker(address, role, worker_id=address, static=True,
                                               tls_ca_file=c.worker_tls_ca_file)

    def register(self, info: pb.WorkerInfo) -> None:
        if self.fingerprint and info.model_fingerprint and info.model_fingerprint != self.fingerprint:
            logger.error("worker %s serves a different model (fingerprint mismatch); ignoring it", info.address)
            return
        worker = self.workers.get(info.address)
        if worker is None:
            worker = Worker(info.address, info.role, tls_ca_file=self.config.worker_tls_ca_file)
            self.workers[info.address] = worker
            logger.info("worker registered: %s (%s, KV on %s)", info.worker_id, worker.role_name,
                        info.transfer_address)
        if worker.role != info.role:
            logger.info("worker %s is now %s", info.worker_id, pb.WorkerRole.Name(info.role).lower())
        worker.role = info.role
        if info.HasField("stats"):
            worker.draining = info.stats.draining
        worker.worker_id = info.worker_id
        worker.transfer_address = info.transfer_address
        worker.fingerprint = info.model_fingerprint
        worker.last_seen = time.monotonic()

    def forget(self, address: str, why: str) -> None:
        """Take a worker out at once (its etcd lease expired, or it re-registered elsewhere). Requests
        already on it finish or fail over as usual; its channel closes with the registry."""
        worker = self.workers.pop(address, None)
        if worker is not None:
            logger.info("worker %s (%s) forgotten: %s", worker.worker_id or address, worker.role_name, why)
            self._forgotten.append(worker)

    def start(self) -> None:
        self._poller = asyncio.create_task(self._poll_loop())

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        for w in [*self.workers.values(), *self._forgotten]:
            if w.channel is not None:
                await w.channel.close()

    async def _poll_one(self, w: Worker) -> None:
        stub = w.prefill_stub if w.role == pb.PREFILL else w.decode_stub
        try:
            stats = await stub.Stats(pb.StatsRequest(), timeout=max(1.0, 2 * self.config.health_interval_s))
        except grpc.aio.AioRpcError as exc:
            w.consecutive_failures += 1
            if w.healthy and w.consecutive_failures >= self.config.unhealthy_after:
                w.healthy = False
                logger.warning("worker %s is unhealthy (%s)", w.worker_id or w.address, exc.code().name)
            return
        if not w.healthy:
            logger.info("worker %s (%s) is healthy", stats.worker_id or w.address, w.role_name)
        w.stats = stats
        w.speed.observe(StepTimes.from_stats(stats))
        w.healthy = True
        w.consecutive_failures = 0
        w.last_seen = time.monotonic()
        if stats.role:
            w.role = stats.role
        w.draining = stats.draining
        w.worker_id = stats.worker_id or w.worker_id

    async def poll_all(self) -> None:
        now = time.monotonic()
        for address, w in list(self.workers.items()):
            if not w.static and now - w.last_seen > self.config.forget_after_s:
                logger.warning("forgetting worker %s: silent for %.0f s", w.worker_id, now - w.last_seen)
                del self.workers[address]
        await asyncio.gather(*(self._poll_one(w) for w in self.workers.values()))

    async def _poll_loop(self) -> None:
        while True:
            try:
                await self.poll_all()
            except Exception:  # noqa: BLE001 - the poller must outlive any one failure
                logger.exception("worker poll failed")
            await asyncio.sleep(self.config.health_interval_s)

    def healthy(self, *roles: int) -> list[Worker]:
        return [w for w in self.workers.values() if w.healthy and w.role in roles]

    def set_role(self, address: str, role: int, draining: bool) -> None:
        """What a SetRole this router made says (it knows before the next poll or registration)."""
        worker = self.workers.get(address)
        if worker is not None:
            worker.role, worker.draining = role, draining

    def unready_reason(self) -> str:
        """'' when the router can serve a request (a decode or colocated worker is healthy), else why
        not. /health, /v1/models and GetModelInfo all answer from this, as vLLM's are up only with the engine."""
        return "" if self.healthy(pb.DECODE, pb.COLOCATED) else "no healthy decode or colocated worker"
