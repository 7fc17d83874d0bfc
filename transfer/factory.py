"""Builds the one KV transport of a process from its TransferConfig (the only place a backend is chosen)."""

from __future__ import annotations

from .base import KVTransport
from .config import TransferConfig


def create_transport(config: TransferConfig, host: str, port: int, *, num_lanes: int,
                     timeout_s: float) -> KVTransport:
    """An unstarted transport: `host` is the address peers are told, `port` 0 picks a free one."""
    if config.kv_transport == "mooncake":
        from .mooncake import MooncakeTransport

        return MooncakeTransport(host, port, timeout_s=timeout_s)  # one engine per process; lanes are UCX's notion
    from .ucx import UCXTransport

    return UCXTransport(host, port, num_lanes=num_lanes, timeout_s=timeout_s,
                        shared_memory=config.transfer_shared_memory, cma_reads=config.transfer_direct_paths,
                        stream_pushes=config.transfer_direct_paths)
