"""TransferConfig: the settings that choose and shape a process's KV transport (workers and store nodes share it).

Listener port, lanes and timeout stay in the component's own config (WorkerConfig, NodeConfig), whose defaults differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .host import SHARED_MEMORY_CHOICES

TRANSPORTS = ("ucx", "mooncake")


def _h(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass(frozen=True, slots=True)
class TransferConfig:
    kv_transport: str = field(default="ucx", metadata=_h(
        "KV transfer backend: ucx (ucxx: shared memory on one host, TCP/RDMA between hosts, CUDA memory) or mooncake "
        "(Mooncake Transfer Engine over TCP, host memory only; the mooncake extra). Every process of a deployment "
        "must use the same one", choices=list(TRANSPORTS)))
    transfer_shared_memory: str = field(default="auto", metadata=_h(
        "whether KV may move through shared memory (UCX sysv/CMA) to a peer: auto (when the peer runs on this kernel "
        "in the same network and pid namespace), on (always; e.g. containers that share IPC and pid), off (never)",
        choices=list(SHARED_MEMORY_CHOICES)))
    transfer_direct_paths: bool = field(default=False, metadata=_h(
        "ucx backend: move KV outside UCX where that measured faster on CPU hosts: to a peer sharing memory by "
        "process_vm_readv of the sender (control over a Unix socket), to another host's host memory up to 8 MiB "
        "over a plain TCP connection (docs/transfer_bandwidth.md). Off: every KV byte moves through UCX"))

    def __post_init__(self) -> None:
        if self.kv_transport not in TRANSPORTS:
            raise ValueError(f"kv_transport must be one of {', '.join(TRANSPORTS)}, got {self.kv_transport!r}")
        if self.transfer_shared_memory not in SHARED_MEMORY_CHOICES:
            raise ValueError(f"transfer_shared_memory must be one of {', '.join(SHARED_MEMORY_CHOICES)}")
