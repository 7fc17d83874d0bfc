"""Keeps a decode reservation's lease alive while this prefill worker queues, computes and pushes its KV.

From the moment a Prefill request arrives until its last push has landed (or failed), `keep` renews
the destination's reservation every third of its lease through the decode worker's Renew RPC. If
this process dies the renewals stop and decode frees the blocks one lease later; if decode answers
that the reservation is gone (released, expired), `on_lost` runs so the prefill stops early.
A failed renewal call is only logged: the next one may reach it, and the lease bounds the rest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from pdserve import rpc
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

MIN_RENEW_INTERVAL_S = 0.05


class LeaseKeeper:
    def __init__(self, tls_ca_file: str = "") -> None:
        self.tls_ca_file = tls_ca_file  # decode workers' gRPC CA (the deployment's one CA, as for the router)
        self._channels: dict[str, grpc.aio.Channel] = {}  # decode gRPC address -> channel
        self.num_renewals = 0
        self.num_lost = 0

    def keep(self, req_id: str, dest: pb.TransferDescriptor, on_lost: Callable[[], None]) -> asyncio.Task | None:
        """A task renewing `dest`'s reservation until cancelled; None when decode gave no lease address."""
        if not dest.lease_address or dest.expires_in_s <= 0:
            return None
        return asyncio.get_running_loop().create_task(self._renew_loop(req_id, dest, on_lost))

    async def _renew_loop(self, req_id: str, dest: pb.TransferDescriptor, on_lost: Callable[[], None]) -> None:
        channel = self._channels.get(dest.lease_address)
        if channel is None:
            channel = self._channels[dest.lease_address] = rpc.channel(dest.lease_address, self.tls_ca_file)
        stub = pb_grpc.DecodeWorkerStub(channel)
        interval_s = max(MIN_RENEW_INTERVAL_S, dest.expires_in_s / 3)
        while True:
            try:
                resp = await stub.Renew(pb.RenewRequest(request_id=req_id, token=dest.token), timeout=interval_s)
            except grpc.aio.AioRpcError as exc:
                logger.info("[%s] renewing the reservation on %s failed: %s", req_id, dest.lease_address,
                            exc.code().name)
            else:
                if not resp.found:
                    self.num_lost += 1
                    logger.warning("[%s] decode %s no longer holds the reservation: stopping", req_id,
                                   dest.lease_address)
                    on_lost()
                    return
                self.num_renewals += 1
                interval_s = max(MIN_RENEW_INTERVAL_S, resp.expires_in_s / 3)
            await asyncio.sleep(interval_s)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
