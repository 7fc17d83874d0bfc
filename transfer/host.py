"""Which peers share this process's memory: a host identity that tells kernels, containers and network namespaces
apart, and the `--transfer-shared-memory auto|on|off` decision built on it. No I/O beyond reading /proc.

Two processes may use a shared-memory path (UCX sysv + CMA) only when they run on one kernel (same boot id), see
each other's processes and share the network namespace they were started in. Hostname + boot id alone is the same in
every network namespace of a host, so the netns "multi-host" deployment used to move KV by CMA without touching
the veth; the namespace inodes make it a separate host.
"""

from __future__ import annotations

import os
import socket

SHARED_MEMORY_CHOICES = ("auto", "on", "off")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _namespace(kind: str) -> str:
    """The inode of this process's `kind` namespace ("net", "pid", ...), e.g. "net:[4026531840]"; "" if unknown."""
    try:
        return os.readlink(f"/proc/self/ns/{kind}")
    except OSError:
        return ""


def host_identity() -> str:
    """Equal for two processes exactly when they share a kernel boot, a network namespace and a pid namespace."""
    boot_id = _read("/proc/sys/kernel/random/boot_id")
    return "/".join([socket.gethostname(), boot_id, _namespace("net"), _namespace("pid")])


def shares_memory_with(setting: str, my_host_id: str, peer_host_id: str) -> bool:
    """Whether to open a shared-memory path to a peer: `on` always, `off` never, `auto` when host identities match."""
    if setting not in SHARED_MEMORY_CHOICES:
        raise ValueError(f"shared memory setting must be one of {SHARED_MEMORY_CHOICES}, got {setting!r}")
    if setting == "auto":
        return my_host_id == peer_host_id
    return setting == "on"
